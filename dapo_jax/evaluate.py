"""Evaluate a checkpoint the way the DAPO paper reports it (AIME 2024 avg@32), or score responses.

  python -m dapo_jax.evaluate --config configs/eval_aime.py --checkpoint DIR [--step N] [--out DIR]
  python -m dapo_jax.evaluate --config configs/eval_aime.py --responses FILE.jsonl [--out DIR]

`--checkpoint` is a HF directory (config.json + safetensors) or a training workdir (latest step, or
`--step`; its tokenizer is the copy the run recorded in <workdir>/run/tokenizer/). Writes
report.json, report.md and samples.jsonl per dataset and prints a summary.

`--responses` scores one JSONL of {id, response} against every dataset of `data.val` (e.g.
`--config.data.val=aime2024,math500`): each row goes to the dataset that has its id. Every problem
needs a response, else it is an error naming how many are missing; `--allow_partial` scores what
is there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence

from dapo_jax.runtime.cli_errors import (VERBOSE_HELP, MissingFileError, UserError, parse_flags,
                                         run_cli)

log = logging.getLogger(__name__)


def _load_checkpoint(path: str, step: int | None, config, mesh):
    """(params, model_config, tokenizer source) from a HF directory, .gguf file, Hub id or a training
    workdir."""
    from dapo_jax import models
    from dapo_jax.models import sources
    from dapo_jax.training import checkpointing, run_record

    m = config.model
    if not checkpointing.is_workdir(path):  # a HF directory, a .gguf file or a Hub id
        try:
            source = sources.resolve(path)
        except FileNotFoundError as e:
            raise MissingFileError(f"--checkpoint {path}: not a training workdir "
                                   f"({checkpointing.CHECKPOINT_DIR}/) either. {e}") from e
        model, cfg = models.load_pretrained(source.local, dtype=m.param_dtype, mesh=mesh,
                                            compute_dtype=m.dtype, remat="none",
                                            scan_layers=m.scan_layers)
        return model.params(), cfg, source.local
    params, cfg, step = checkpointing.restore_workdir_params(
        path, step, mesh, flag="--checkpoint", dtype=m.dtype, remat="none",
        scan_layers=m.scan_layers)
    # The config's tokenizer when set, else the one the run recorded, else (older workdirs) the toy
    # tokenizer the run built or model.path.
    tok = (config.tokenizer.path or run_record.workdir_tokenizer(checkpointing.workdir_path(path))
           or config.model.path)
    if not tok:
        raise MissingFileError(
            f"--checkpoint {path}: the workdir records no tokenizer (run/tokenizer/ is missing: the "
            "run predates run records); pass --config.tokenizer.path=DIR (a folder with "
            "tokenizer.json)")
    log.info("loaded step %d from %s", step, path)
    return params, cfg, tok


def _score_responses(config, responses: str, out: str, cache_dir, *, allow_partial: bool
                     ) -> dict[str, Any]:
    """Scores one responses file against every dataset of data.val (rows go by problem id)."""
    from data_pipeline import datasets as ds_lib
    from dapo_jax.config_validation import as_list
    from dapo_jax.eval import report

    problems_of: dict[str, list[dict]] = {}
    for spec in as_list(config.data.val):
        records = ds_lib.load_records(spec, config, split="val", cache_dir=cache_dir,
                                      shared=ds_lib.cache_is_shared(config, out))
        problems_of[ds_lib.dataset_name(spec)] = [{"id": str(r["id"]), "answer": r["ground_truth"]}
                                                  for r in records]
    dataset_of = {}
    for name, problems in problems_of.items():
        for pr in problems:
            dataset_of.setdefault(pr["id"], name)  # an id two datasets share goes to the first
    samples = report.read_responses_jsonl(responses, list(dataset_of))
    by_dataset: dict[str, list[dict]] = {name: [] for name in problems_of}
    for sample in samples:
        by_dataset[dataset_of[sample["problem_id"]]].append(sample)
    answered = {s["problem_id"] for s in samples}
    missing = {name: [pr["id"] for pr in problems if pr["id"] not in answered]
               for name, problems in problems_of.items()}
    total_missing = sum(len(v) for v in missing.values())
    if total_missing and not allow_partial:
        detail = "; ".join(f"{name}: {len(ids)} of {len(problems_of[name])}, e.g. {ids[:3]}"
                           for name, ids in missing.items() if ids)
        raise UserError(f"{responses}: {total_missing} problems have no response ({detail}). "
                        "Add their responses, drop the dataset from --config.data.val, or pass "
                        "--allow_partial to score only the problems that have responses")
    boxed_fallback = bool(config.reward.get("boxed_fallback", False))
    results: dict[str, Any] = {}
    for name, problems in problems_of.items():
        if not by_dataset[name]:
            print(f"{name}: no responses in {responses}; skipped (--allow_partial)")
            continue
        summary = report.write_report(
            problems, by_dataset[name], os.path.join(out, name), dataset=name,
            scorer=ds_lib.DEFAULT_SCORER.get(name, config.reward.scorer),
            boxed_fallback=boxed_fallback)
        print(summary)
        with open(os.path.join(out, name, report.REPORT_JSON)) as f:
            results[name] = json.load(f)["metrics"]
    return results


def run(config, *, checkpoint: str | None, step: int | None, responses: str | None, out: str,
        progress: bool | None = None, allow_partial: bool = False) -> dict[str, Any]:
    """Evaluates every dataset in config.data.val; returns {dataset: metrics}."""
    from data_pipeline import datasets as ds_lib
    from dapo_jax import experiment
    from dapo_jax.config_validation import as_list, normalize_lists
    from dapo_jax.eval.runner import evaluate_records
    from dapo_jax.sampler import RolloutDriver

    normalize_lists(config)
    results: dict[str, Any] = {}
    # No workdir here: data.cache_dir, else <out>/tfds (a local cache when --out is on gs://).
    cache_dir = ds_lib.cache_dir(config, out)
    boxed_fallback = bool(config.reward.get("boxed_fallback", False))
    if responses:
        return _score_responses(config, responses, out, cache_dir, allow_partial=allow_partial)
    if not checkpoint:
        raise UserError("give --checkpoint (HF dir or training workdir) or --responses FILE")
    import jax

    from dapo_jax.runtime.mesh_config import mesh_sizes
    mesh_sizes(config.mesh, jax.device_count())  # a mesh that does not tile the devices: UserError
    mesh = experiment.mesh_from_config(config)
    params, cfg, tok_dir = _load_checkpoint(checkpoint, step, config, mesh)
    # The checkpoint decides the architecture; the config decides everything else, as in training.
    exp = experiment.build(config, tokenizer_dir=tok_dir, model_config=cfg, mesh=mesh)
    e = config.eval
    driver = RolloutDriver(exp.engine(max_new_tokens=e.max_new_tokens), params,
                           steps_per_sync=config.rollout.steps_per_sync, tokenizer=exp.tokenizer,
                           progress=progress)
    for spec in as_list(config.data.val):
        name = ds_lib.dataset_name(spec)
        records = ds_lib.load_records(spec, config, split="val", cache_dir=cache_dir,
                                      shared=ds_lib.cache_is_shared(config, out))
        if e.max_problems:
            records = records[:e.max_problems]
        summary, metrics = evaluate_records(
            driver, exp.tokenizer, records, dataset=name, n=e.n, sampling=exp.eval_sampling,
            max_new_tokens=e.max_new_tokens, max_prompt_length=exp.prompt_length,
            system_prompt=config.data.system_prompt,
            apply_chat_template=config.data.apply_chat_template, out_dir=os.path.join(out, name),
            scorer=ds_lib.DEFAULT_SCORER.get(name, config.reward.scorer), seed=config.seed,
            boxed_fallback=boxed_fallback, truncation=config.data.get("truncation", "left"))
        print(summary, flush=True)
        results[name] = metrics
    return results


def main(argv: Sequence[str] | None = None) -> None:
    from absl import flags
    from ml_collections import config_flags

    flags_ = flags.FlagValues()
    argv = list(argv if argv is not None else sys.argv)
    config_flags.DEFINE_config_file("config", "configs/eval_aime.py", "Eval config file.",
                                    flag_values=flags_, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("checkpoint", None, "HF directory or training workdir.", flag_values=flags_)
    flags.DEFINE_integer("step", None, "Step of a training workdir (default: latest).",
                         flag_values=flags_)
    flags.DEFINE_string("responses", None, "Score this JSONL of {id, response} instead of "
                        "generating.", flag_values=flags_)
    flags.DEFINE_string("out", "eval_out", "Output folder for the reports.", flag_values=flags_)
    flags.DEFINE_bool("allow_partial", False, "With --responses: score the problems that have "
                      "responses instead of stopping when some have none.", flag_values=flags_)
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=flags_)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        # absl handles --help only for its global flags (app.run); these flags are private.
        print(__doc__)
        print(flags_.get_help())
        sys.exit(0)
    parse_flags(argv, flags_)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = run(flags_.config, checkpoint=flags_.checkpoint, step=flags_.step,
                  responses=flags_.responses, out=flags_.out, allow_partial=flags_.allow_partial)
    with open(os.path.join(flags_.out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    run_cli(main)  # user errors: `error: ...` and exit status 2, no traceback
