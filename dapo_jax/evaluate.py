"""Evaluate a checkpoint the way the DAPO paper reports it (AIME 2024 avg@32), or score responses.

  python -m dapo_jax.evaluate --config configs/eval_aime.py --checkpoint DIR [--step N] [--out DIR]
  python -m dapo_jax.evaluate --config configs/eval_aime.py --responses FILE.jsonl [--out DIR]

`--checkpoint` is a HF directory (config.json + safetensors) or a training workdir (latest step, or
`--step`). Writes report.json, report.md and samples.jsonl per dataset and prints a summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence


log = logging.getLogger(__name__)


def _load_checkpoint(path: str, step: int | None, config, mesh):
    """(params, model_config, tokenizer_dir) from a HF directory or a training workdir."""
    import jax
    from etils import epath
    from flax import nnx

    from dapo_jax import models
    from dapo_jax.models.config import ModelConfig
    from dapo_jax.training.checkpointing import CHECKPOINT_DIR, CheckpointStore

    p = epath.Path(path)
    m = config.model
    if (p / "config.json").exists():
        model, cfg = models.load_pretrained(p, dtype=m.param_dtype, mesh=mesh, compute_dtype=m.dtype,
                                            remat="none", scan_layers=m.scan_layers)
        return model.params(), cfg, os.fspath(p)
    if not (p / CHECKPOINT_DIR).exists():
        raise FileNotFoundError(f"--checkpoint {path}: neither a HF directory (config.json) nor a "
                                f"training workdir ({CHECKPOINT_DIR}/)")
    store = CheckpointStore(p)
    steps = store.all_steps()
    if not steps:
        raise FileNotFoundError(f"{store.directory} holds no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step} not in {store.directory}; available steps: {steps}")
    fields = dict(store.read_meta(step)["model_config"])
    fields.update(dtype=m.dtype, remat="none", scan_layers=m.scan_layers)
    cfg = ModelConfig(**fields)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: models.Qwen2(cfg, rngs=nnx.Rngs(0)).params()),
        models.param_shardings(cfg, mesh))
    params = store.restore_params(step, abstract)
    store.close()
    tok = config.tokenizer.path or (os.fspath(p / "toy_tokenizer") if (p / "toy_tokenizer").exists()
                                    else config.model.path)
    log.info("loaded step %d from %s", step, store.directory)
    return params, cfg, tok


def run(config, *, checkpoint: str | None, step: int | None, responses: str | None, out: str,
        progress: bool | None = None) -> dict[str, Any]:
    """Evaluates every dataset in config.data.val; returns {dataset: metrics}."""
    from data_pipeline import datasets as ds_lib
    from dapo_jax import experiment
    from dapo_jax.eval import report
    from dapo_jax.eval.runner import evaluate_records
    from dapo_jax.sampler import RolloutDriver

    results: dict[str, Any] = {}
    cache_dir = ds_lib.cache_dir(config, out)  # no workdir here: data.cache_dir, else <out>/tfds
    boxed_fallback = bool(config.reward.get("boxed_fallback", False))
    if responses:
        for spec in config.data.val:
            name = ds_lib.dataset_name(spec)
            records = ds_lib.load_records(spec, config, split="val", cache_dir=cache_dir)
            problems = [{"id": r["id"], "answer": r["ground_truth"]} for r in records]
            summary = report.score_responses_file(
                responses, problems, os.path.join(out, name), dataset=name,
                scorer=ds_lib.DEFAULT_SCORER.get(name, config.reward.scorer),
                boxed_fallback=boxed_fallback)
            print(summary)
            with open(os.path.join(out, name, report.REPORT_JSON)) as f:
                results[name] = json.load(f)["metrics"]
        return results
    if not checkpoint:
        raise ValueError("give --checkpoint (HF dir or training workdir) or --responses FILE")
    mesh = experiment.mesh_from_config(config)
    params, cfg, tok_dir = _load_checkpoint(checkpoint, step, config, mesh)
    # The checkpoint decides the architecture; the config decides everything else, as in training.
    exp = experiment.build(config, tokenizer_dir=tok_dir, model_config=cfg, mesh=mesh)
    e = config.eval
    driver = RolloutDriver(exp.engine(max_new_tokens=e.max_new_tokens), params,
                           steps_per_sync=config.rollout.steps_per_sync, tokenizer=exp.tokenizer,
                           progress=progress)
    for spec in config.data.val:
        name = ds_lib.dataset_name(spec)
        records = ds_lib.load_records(spec, config, split="val", cache_dir=cache_dir)
        if e.max_problems:
            records = records[:e.max_problems]
        summary, metrics = evaluate_records(
            driver, exp.tokenizer, records, dataset=name, n=e.n, sampling=exp.eval_sampling,
            max_new_tokens=e.max_new_tokens, max_prompt_length=exp.prompt_length,
            system_prompt=config.data.system_prompt,
            apply_chat_template=config.data.apply_chat_template, out_dir=os.path.join(out, name),
            scorer=ds_lib.DEFAULT_SCORER.get(name, config.reward.scorer), seed=config.seed,
            boxed_fallback=boxed_fallback)
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
    flags_(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = run(flags_.config, checkpoint=flags_.checkpoint, step=flags_.step,
                  responses=flags_.responses, out=flags_.out)
    with open(os.path.join(flags_.out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
