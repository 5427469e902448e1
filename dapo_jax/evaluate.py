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
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence


log = logging.getLogger(__name__)


def evaluate_records(driver, tokenizer, records: Sequence[dict], *, dataset: str, n: int, sampling,
                     max_new_tokens: int, max_prompt_length: int, system_prompt: str | None,
                     apply_chat_template: bool, out_dir, scorer: str = "math_dapo", seed: int = 0,
                     write: bool = True,
                     boxed_fallback: bool = False) -> tuple[str, dict[str, float]]:
    """Generates n samples per problem, scores them and writes the reports; returns (summary, metrics)."""
    import data_pipeline as dp
    from dapo_jax.eval import report
    from dapo_jax.sampler import RolloutRequest

    rendered = dp.render_prompts(tokenizer, records, max_prompt_length=max_prompt_length,
                                 system_prompt=system_prompt, apply_chat_template=apply_chat_template)
    t0 = time.perf_counter()
    result = driver.generate([RolloutRequest(ids, n=n, max_new_tokens=max_new_tokens)
                              for ids in rendered.token_ids], seed=seed, sampling=sampling,
                             desc=f"eval {dataset}")
    gen_s = time.perf_counter() - t0
    problems = [{"id": r["id"], "answer": r["ground_truth"]} for r in records]
    samples = []
    for rec, group in zip(records, result.samples):
        for s in group:
            text = s.text if s.text is not None else tokenizer.decode(s.tokens, skip_special_tokens=True)
            samples.append({"problem_id": rec["id"], "response": text, "length": s.length,
                            "finish_reason": s.finish_reason})
    # Only the writing process (process 0) reports into the shared workdir; the others compute the
    # same metrics in a private folder (deleting their copies there deleted process 0's reports).
    out_dir = os.fspath(out_dir) if write else tempfile.mkdtemp(prefix="dapo_eval_")
    summary = report.write_report(problems, samples, out_dir, dataset=dataset, scorer=scorer,
                                  max_length=max_new_tokens, boxed_fallback=boxed_fallback)
    with open(os.path.join(out_dir, report.REPORT_JSON)) as f:
        metrics = dict(json.load(f)["metrics"])
    tokens = sum(s["length"] for s in samples)
    metrics[f"val-aux/{dataset}/timing_s/gen"] = gen_s
    metrics[f"val-aux/{dataset}/tokens_per_s"] = tokens / max(gen_s, 1e-9)
    if not write:
        shutil.rmtree(out_dir, ignore_errors=True)
    summary += f"\ngenerated {tokens:,} tokens in {gen_s:.1f}s ({tokens / max(gen_s, 1e-9):,.0f} tok/s)"
    return summary, metrics


def _load_checkpoint(path: str, step: int | None, config, mesh):
    """(params, model_config, tokenizer_dir) from a HF directory or a training workdir."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath
    from flax import nnx

    from dapo_jax import models
    from dapo_jax.models.config import ModelConfig

    p = epath.Path(path)
    m = config.model
    overrides = dict(dtype=m.dtype, remat="none", scan_layers=m.scan_layers)
    if (p / "config.json").exists():
        model, cfg = models.load_pretrained(p, dtype=m.param_dtype, mesh=mesh, compute_dtype=m.dtype,
                                            remat="none", scan_layers=m.scan_layers)
        return model.params(), cfg, os.fspath(p)
    ckpt_dir = p / "checkpoints"
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"--checkpoint {path}: neither a HF directory (config.json) nor a "
                                f"training workdir (checkpoints/)")
    mngr = ocp.CheckpointManager(os.fspath(ckpt_dir))
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step} not in {ckpt_dir}; available steps: {sorted(steps)}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    fields = dict(meta["model_config"])
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    shardings = models.param_shardings(cfg, mesh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: models.Qwen2(cfg, rngs=nnx.Rngs(0)).params()),
        shardings)
    params = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract))).params
    mngr.close()
    tok = config.tokenizer.path or (os.fspath(p / "toy_tokenizer") if (p / "toy_tokenizer").exists()
                                    else config.model.path)
    log.info("loaded step %d from %s", step, ckpt_dir)
    return params, cfg, tok


def run(config, *, checkpoint: str | None, step: int | None, responses: str | None, out: str,
        progress: bool | None = None) -> dict[str, Any]:
    """Evaluates every dataset in config.data.val; returns {dataset: metrics}."""
    from dapo_jax import datasets as ds_lib
    from dapo_jax import models
    from dapo_jax.eval import report
    from dapo_jax.models.sharding import make_mesh
    from dapo_jax.sampler import Engine, RolloutDriver, SamplingParams, out_major_option

    results: dict[str, Any] = {}
    if responses:
        for spec in config.data.val:
            name = ds_lib.dataset_name(spec)
            records = ds_lib.load_records(spec, config, split="val")
            problems = [{"id": r["id"], "answer": r["ground_truth"]} for r in records]
            summary = report.score_responses_file(
                responses, problems, os.path.join(out, name), dataset=name,
                scorer=ds_lib.DEFAULT_SCORER.get(name, config.reward.scorer),
                boxed_fallback=config.reward.boxed_fallback)
            print(summary)
            with open(os.path.join(out, name, report.REPORT_JSON)) as f:
                results[name] = json.load(f)["metrics"]
        return results
    if not checkpoint:
        raise ValueError("give --checkpoint (HF dir or training workdir) or --responses FILE")
    mesh = make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
                     devices=__import__("jax").devices()[:config.mesh.num_devices or None])
    params, cfg, tok_dir = _load_checkpoint(checkpoint, step, config, mesh)
    tokenizer = models.load_tokenizer(tok_dir)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    stop += [vocab[t] for t in config.tokenizer.stop_tokens if t in vocab and vocab[t] not in stop]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    e = config.eval
    P, R = config.data.max_prompt_length, e.max_new_tokens
    engine = Engine(cfg, max_concurrent_decodes=config.rollout.max_concurrent_decodes,
                    max_prefill_length=P, max_target_length=P + R, stop_token_ids=stop,
                    pad_token_id=pad, mesh=mesh, cache_dtype=config.rollout.cache_dtype,
                    per_layer_weights=config.rollout.per_layer_weights,
                    out_major_weights=out_major_option(
                        config.rollout.get("out_major_weights", "auto")))
    driver = RolloutDriver(engine, params, steps_per_sync=config.rollout.steps_per_sync,
                           tokenizer=tokenizer, progress=progress)
    sampling = SamplingParams(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
    for spec in config.data.val:
        name = ds_lib.dataset_name(spec)
        records = ds_lib.load_records(spec, config, split="val")
        if e.max_problems:
            records = records[:e.max_problems]
        summary, metrics = evaluate_records(
            driver, tokenizer, records, dataset=name, n=e.n, sampling=sampling, max_new_tokens=R,
            max_prompt_length=P, system_prompt=config.data.system_prompt,
            apply_chat_template=config.data.apply_chat_template, out_dir=os.path.join(out, name),
            scorer=ds_lib.DEFAULT_SCORER.get(name, config.reward.scorer), seed=config.seed,
            boxed_fallback=config.reward.boxed_fallback)
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
