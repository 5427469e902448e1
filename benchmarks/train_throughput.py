"""One DAPO update on DAPO-shaped lengths: padded rows (as before issue 15) vs packed rows.

A DAPO batch has responses from a few tokens to the maximum, mostly short. The padded layout
computes every sample at prompt + maximum response tokens (with the dense [T, S] attention it used
then); the packed layout (the trainer's default) puts samples end to end in rows of the token
budget and attends blockwise within each sample. Both run the trainer's own jitted programs
(`training.update`) on the same samples: the old-log-prob pass, then one optimizer update (all
micro-batches of the mini-batch), on one device, at the same per-micro-batch token budget.

    python -m benchmarks.train_throughput                 # Qwen2.5-0.5B, 2,048-token maximum, CPU
    python -m benchmarks.train_throughput --samples 64 --dtype bfloat16    # GPU/TPU
    python -m benchmarks.train_throughput --smoke         # tiny preset, seconds

Printed: the length distribution, useful (non-padding) tokens/s of both and their ratio, compiled
peak memory of both, MFU against this machine's measured matmul peak, and the compiled memory of
one packed gradient step at 1k/2k/4k-token rows (blockwise vs dense attention).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import common
from configs.base import get_base_config
from dapo_jax import experiment, models
from dapo_jax.runtime.devices import device_spec
from dapo_jax.models.attention import resolve_attention
from dapo_jax.models.config import DTYPES, REMAT_POLICIES, ModelConfig
from dapo_jax.models.sharding import make_mesh
from dapo_jax.training import batching
from dapo_jax.training.update import (METRIC_SUMS, LossSettings, batch_spec, build_apply_fn,
                                      build_minibatch_logprob_fn, build_packed_grad_fn,
                                      build_packed_logprob_fn, build_update_fn, build_zero_fn,
                                      init_opt_state, make_optimizer)

GIB = 2 ** 30


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring for example invocations)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b", help="model size preset (models.PRESETS)")
    p.add_argument("--samples", type=int, default=8, help="samples in the mini-batch (one update)")
    p.add_argument("--max_len", type=int, default=2048, help="max prompt + max response tokens")
    p.add_argument("--prompt_len", type=int, default=128, help="max prompt tokens (prompts are "
                   "drawn uniformly from half to all of it)")
    p.add_argument("--mean_fraction", type=float, default=0.25,
                   help="mean response length as a fraction of the max response length")
    p.add_argument("--truncated", type=float, default=0.05,
                   help="fraction of responses cut at the max response length")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="matmul/activation dtype")
    p.add_argument("--remat", default="full", choices=REMAT_POLICIES, help="per-layer remat policy")
    p.add_argument("--padded_attention", default="dense",
                   help="attention of the padded baseline ('dense': what it used before issue 15)")
    p.add_argument("--memory_lens", default="1024,2048,4096",
                   help="row lengths for the compiled-memory table ('' to skip)")
    p.add_argument("--matmul_n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 2048 on CPU, "
                        "8192 on GPU/TPU)")
    p.add_argument("--trim_steps", type=int, default=8,
                   help="packed rows may be cut to multiples of row / trim_steps tokens "
                        "(trainer.packing_trim_steps; 1 = rows keep the bucket's length)")
    p.add_argument("--micro_rows", type=int, default=1,
                   help="token budget per micro-batch, in full-length rows: padded micro-batches "
                        "hold this many rows, packed ones this many x --max_len tokens")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs of each layout (the update continues from the last one's "
                        "parameters); the fastest is reported, the first as well")
    p.add_argument("--layouts", default="padded,packed",
                   help="comma-separated layouts to run (padded, packed); the ratio needs both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, 8 samples of at most 64 tokens: checks it runs, in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.samples, args.max_len, args.prompt_len = "tiny", 8, 64, 16
        args.memory_lens, args.matmul_n = "64,128", 256
    if args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")
    if args.micro_rows < 1 or args.samples % args.micro_rows:
        p.error(f"--micro_rows ({args.micro_rows}) must be >= 1 and divide --samples "
                f"({args.samples}): padded micro-batches are that many rows")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not args.layouts or set(args.layouts) - {"padded", "packed"}:
        p.error(f"--layouts must name padded and/or packed, got {','.join(args.layouts)!r}")
    if not 2 <= args.prompt_len < args.max_len:
        p.error(f"--prompt_len must be in [2, --max_len={args.max_len}), got {args.prompt_len}")
    if not 0 < args.mean_fraction <= 1 or not 0 <= args.truncated < 1:
        p.error("--mean_fraction must be in (0, 1] and --truncated in [0, 1)")
    if args.matmul_n is None:
        args.matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
    return args


def dapo_lengths(n: int, max_response: int, mean_fraction: float, truncated: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Response lengths: lognormal (sigma 1) with mean `mean_fraction` x max, `truncated` of them
    at the maximum (overlong samples), the rest clipped to [1, max - 1]."""
    sigma = 1.0
    mu = np.log(mean_fraction * max_response) - sigma ** 2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, max_response - 1).astype(np.int64)
    cut = rng.permutation(n)[:int(round(truncated * n))]
    lengths[cut] = max_response
    return lengths


def _model(args, attention: str) -> ModelConfig:
    config = get_base_config()
    config.model.preset = args.preset
    config.model.vocab_size = models.preset(args.preset).vocab_size
    config.model.dtype, config.model.remat, config.model.param_dtype = args.dtype, args.remat, "float32"
    config.model.attention = attention
    return experiment.resolve_model_config(config)


def _samples(cfg: ModelConfig, args, rng):
    r_max = args.max_len - args.prompt_len
    responses_len = dapo_lengths(args.samples, r_max, args.mean_fraction, args.truncated, rng)
    prompt_len = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=args.samples)
    prompts = [rng.integers(3, cfg.vocab_size, size=k).astype(np.int32) for k in prompt_len]
    responses = [rng.integers(3, cfg.vocab_size, size=k).astype(np.int32) for k in responses_len]
    # Random-init logits are near uniform: old log-probs near -log(V) keep the ratio in the clip.
    logprobs = np.zeros((args.samples, r_max), np.float32)
    for i, k in enumerate(responses_len):
        logprobs[i, :k] = -np.log(cfg.vocab_size) + 0.05 * rng.standard_normal(k)
    advantages = rng.choice([-1.0, 1.0], size=args.samples).astype(np.float32)
    return prompts, responses, logprobs, advantages


def _place(mesh, arrays: dict[str, np.ndarray], leading: int) -> dict[str, jax.Array]:
    return {k: jax.device_put(v, NamedSharding(mesh, batch_spec(v.ndim, leading=leading)))
            for k, v in arrays.items()}


def _memory(compiled) -> float:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)


def _timed_runs(step, repeats: int, layout: str) -> dict[str, float]:
    """Calls `step()` -> (old-log-prob s, update s, loss) `repeats` times; the fastest run's
    times, the first run's total (allocation and autotuning land there on an accelerator)."""
    runs = [step() for _ in range(repeats)]
    for _, _, loss in runs:
        if not np.isfinite(loss):
            raise FloatingPointError(f"{layout} update produced a non-finite loss ({loss})")
    old_s, update_s, _ = min(runs, key=lambda r: r[0] + r[1])
    return {"old_logprob_s": old_s, "update_s": update_s, "first_run_s": runs[0][0] + runs[0][1],
            "loss": runs[0][2], "repeats": repeats}


def run_padded(args, mesh, samples, loss: LossSettings, tx) -> dict[str, Any]:
    """Old log-probs + one update on padded rows [P | R], micro-batches of --micro_rows rows."""
    cfg = _model(args, args.padded_attention)
    prompts, responses, logprobs, advantages = samples
    p_len, r_len = args.prompt_len, args.max_len - args.prompt_len
    rows = batching.pad_rows(prompts, responses, [lp[:len(r)] for lp, r in zip(logprobs, responses)],
                             prompt_length=p_len, response_length=r_len, pad_id=0)
    host = {"input_ids": np.concatenate([rows["prompt_ids"], rows["response_ids"]], 1),
            "attention_mask": np.concatenate([rows["prompt_mask"], rows["response_mask"]], 1),
            "response_mask": rows["response_mask"], "rollout_logprobs": rows["rollout_logprobs"],
            "advantages": advantages}
    (mb,) = batching.minibatches(host, mini_batch_size=args.samples,
                                 micro_batch_size=args.micro_rows)
    params = models.init_model(cfg, seed=0).params()
    shardings = models.param_shardings(cfg, mesh)
    params = jax.device_put(params, shardings)
    opt_state, opt_sh = init_opt_state(tx, params)
    logprob = build_minibatch_logprob_fn(cfg, mesh, shardings, p_len, loss)
    update = build_update_fn(cfg, tx, mesh, shardings, opt_sh, p_len, loss)
    dev = _place(mesh, mb, leading=1)
    rep = NamedSharding(mesh, PartitionSpec())
    t0 = time.perf_counter()
    lp_c = logprob.lower(params, dev["input_ids"], dev["attention_mask"], dev["response_mask"],
                         dev["rollout_logprobs"]).compile()
    upd_in = {k: dev[k] for k in ("input_ids", "attention_mask", "response_mask", "advantages")}
    upd_in["old_logprobs"] = dev["rollout_logprobs"]
    upd_in["token_count"] = jax.device_put(jnp.float32(mb["response_mask"].sum()), rep)
    upd_in["seq_count"] = jax.device_put(jnp.float32(args.samples), rep)
    lr = jax.device_put(jnp.float32(1e-6), rep)
    up_c = update.lower(params, opt_state, upd_in, lr).compile()
    compile_s = time.perf_counter() - t0
    state = {"params": params, "opt_state": opt_state}

    def step():
        t0 = time.perf_counter()
        old, _ = lp_c(state["params"], dev["input_ids"], dev["attention_mask"],
                      dev["response_mask"], dev["rollout_logprobs"])
        jax.block_until_ready(old)
        t_old = time.perf_counter() - t0
        upd_in["old_logprobs"] = old
        t0 = time.perf_counter()
        state["params"], state["opt_state"], metrics = up_c(state["params"], state["opt_state"],
                                                            upd_in, lr)
        jax.block_until_ready(state["params"])
        return t_old, time.perf_counter() - t0, float(metrics["loss"])

    return {"compile_s": compile_s, **_timed_runs(step, args.repeats, "padded"),
            "computed_tokens": int(args.samples * args.max_len),
            "peak_bytes": max(_memory(lp_c), _memory(up_c)),
            "micro_batches": args.samples // args.micro_rows, "row_length": args.max_len}


def run_packed(args, mesh, samples, loss: LossSettings, tx) -> dict[str, Any]:
    """Old log-probs + one update on packed rows of the same token budget (--micro_rows full
    rows)."""
    cfg = _model(args, "auto")
    prompts, responses, logprobs, advantages = samples
    layout = batching.packing_layout(args.max_len, args.micro_rows * (-(-args.max_len // 16) * 16),
                                     1, 3, trim_steps=args.trim_steps)
    pm = batching.pack_minibatch(prompts, responses, logprobs, advantages,
                                 np.ones(args.samples, np.int8), layout, pad_id=0)
    params = models.init_model(cfg, seed=0).params()
    shardings = models.param_shardings(cfg, mesh)
    params = jax.device_put(params, shardings)
    opt_state, opt_sh = init_opt_state(tx, params)
    logprob = build_packed_logprob_fn(cfg, mesh, shardings, loss)
    grad = build_packed_grad_fn(cfg, mesh, shardings, loss, args.max_len - args.prompt_len)
    zero = build_zero_fn(mesh, shardings)
    apply = build_apply_fn(tx, mesh, shardings, opt_sh)
    rep = NamedSharding(mesh, PartitionSpec())
    micro = [_place(mesh, pm.micro(m), leading=0) for m in range(pm.num_micro)]
    lp_fields = ("input_ids", "segment_ids", "positions", "response_mask", "rollout_logprobs")
    grad_fields = ("input_ids", "segment_ids", "positions", "response_mask", "advantages")
    token_count = jax.device_put(jnp.float32(pm.token_count), rep)
    seq_count = jax.device_put(jnp.float32(pm.seq_count), rep)
    lr = jax.device_put(jnp.float32(1e-6), rep)
    # One program per micro-batch shape (the last micro-batch may have fewer rows).
    t0 = time.perf_counter()
    lp_c, grad_c = {}, {}
    grads, sums = zero(params)
    for m in micro:
        shape = m["input_ids"].shape
        if shape not in lp_c:
            lp_c[shape] = logprob.lower(params, {k: m[k] for k in lp_fields}).compile()
            inputs = {k: m[k] for k in grad_fields}
            inputs["old_logprobs"] = m["rollout_logprobs"]
            grad_c[shape] = grad.lower(params, grads, sums, inputs, token_count,
                                       seq_count).compile()
    apply_c = apply.lower(params, opt_state, grads, lr).compile()
    compile_s = time.perf_counter() - t0
    state = {"params": params, "opt_state": opt_state}

    def step():
        params = state["params"]
        t0 = time.perf_counter()
        old = [lp_c[m["input_ids"].shape](params, {k: m[k] for k in lp_fields})[0] for m in micro]
        jax.block_until_ready(old)
        t_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        grads, sums = zero(params)
        for m, o in zip(micro, old):
            inputs = {k: m[k] for k in grad_fields}
            inputs["old_logprobs"] = o
            grads, sums = grad_c[m["input_ids"].shape](params, grads, sums, inputs, token_count,
                                                       seq_count)
        state["params"], state["opt_state"], _ = apply_c(params, state["opt_state"], grads, lr)
        jax.block_until_ready(state["params"])
        assert set(sums) == set(METRIC_SUMS)
        return t_old, time.perf_counter() - t0, float(sums["loss"])

    return {"compile_s": compile_s, **_timed_runs(step, args.repeats, "packed"),
            "computed_tokens": int(pm.fields["input_ids"].size),
            "peak_bytes": max([_memory(c) for c in (*lp_c.values(), *grad_c.values(), apply_c)]),
            "micro_batches": pm.num_micro, "row_length": pm.row_length, "fill": pm.fill}


def memory_scaling(args, mesh, loss: LossSettings, lengths: Sequence[int]) -> list[dict[str, Any]]:
    """Compiled bytes (temporaries) of one packed gradient step on one row of each length."""
    out = []
    for attention in ("auto", "dense"):
        cfg = _model(args, attention)
        shardings = models.param_shardings(cfg, mesh)
        params = jax.eval_shape(lambda: models.init_model(cfg, seed=0).params())
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              params, shardings)
        grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                            sharding=x.sharding), params)
        rep = NamedSharding(mesh, PartitionSpec())
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        sums = {k: scalar for k in METRIC_SUMS}
        grad = build_packed_grad_fn(cfg, mesh, shardings, loss, max(lengths))
        for n in lengths:
            row = NamedSharding(mesh, batch_spec(2))
            micro = {k: jax.ShapeDtypeStruct((1, n), jnp.float32 if k in ("old_logprobs",
                                                                          "advantages")
                                             else jnp.int32, sharding=row)
                     for k in ("input_ids", "segment_ids", "positions", "response_mask",
                               "old_logprobs", "advantages")}
            m = grad.lower(params, grads, sums, micro, scalar, scalar).compile().memory_analysis()
            out.append({"attention": "blockwise" if attention == "auto" else attention,
                        "row_length": n, "temp_bytes": float(m.temp_size_in_bytes)})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the batch, runs both layouts and the memory table; returns every number."""
    rng = np.random.default_rng(args.seed)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    cfg = _model(args, "auto")
    samples = _samples(cfg, args, rng)
    prompts, responses = samples[0], samples[1]
    r_len = np.asarray([len(r) for r in responses])
    useful = int(sum(len(p) + len(r) for p, r in zip(prompts, responses)))
    r_max = args.max_len - args.prompt_len
    loss = LossSettings(chunk_size=256, loss_scale_length=float(r_max))
    tx = make_optimizer(weight_decay=0.1, grad_clip=1.0)
    runners = {"padded": run_padded, "packed": run_packed}
    results = {name: runners[name](args, mesh, samples, loss, tx) for name in args.layouts}
    fwd = cfg.flops_per_token(int(np.mean([len(p) + len(r) for p, r in zip(prompts, responses)])))
    peak = common.measured_matmul_flops(args.dtype, args.matmul_n)
    env = common.environment()
    spec = device_spec(env["device_kind"]) if env["backend"] != "cpu" else None
    for r in results.values():
        r["seconds"] = r["old_logprob_s"] + r["update_s"]
        r["useful_tokens_per_s"] = useful / r["seconds"]
        # Useful work: a forward (old log-probs) and a forward + backward (3x) per real token.
        r["useful_flops_per_s"] = 4 * fwd * useful / r["seconds"]
        r["mfu"] = r["useful_flops_per_s"] / peak
        r["mfu_published"] = r["useful_flops_per_s"] / spec.peak_bf16_flops if spec else None
    lens = [int(x) for x in args.memory_lens.split(",") if x.strip()]
    return {
        "benchmark": "train_throughput", "environment": env,
        "config": {"preset": args.preset, "samples": args.samples, "max_len": args.max_len,
                   "prompt_len": args.prompt_len, "dtype": args.dtype, "remat": args.remat,
                   "padded_attention": args.padded_attention, "num_params": cfg.num_params,
                   "micro_rows": args.micro_rows, "repeats": args.repeats,
                   "packed_attention": resolve_attention(cfg.attention), "layouts": args.layouts},
        "device_spec": None if spec is None else vars(spec),
        "lengths": {"mean": float(r_len.mean()), "median": float(np.median(r_len)),
                    "p90": float(np.percentile(r_len, 90)), "max": int(r_len.max()),
                    "truncated": float(np.mean(r_len == r_max)), "max_response": r_max},
        "useful_tokens": useful, "matmul_peak_flops": peak, "results": results,
        "ratio": (results["packed"]["useful_tokens_per_s"] / results["padded"]["useful_tokens_per_s"]
                  if len(results) == 2 else None),
        "memory_scaling": memory_scaling(args, mesh, loss, lens) if lens else [],
    }


def format_report(r: dict[str, Any]) -> str:
    """The length distribution, the throughput table and the memory-scaling table."""
    c, L, env = r["config"], r["lengths"], r["environment"]
    spec = r.get("device_spec")
    rows = []
    for name, x in r["results"].items():
        rows.append([name, x["row_length"], x["micro_batches"], common.fmt(x["computed_tokens"]),
                     common.fmt(x["compile_s"]), common.fmt(x["old_logprob_s"]),
                     common.fmt(x["update_s"]), common.fmt(x["useful_tokens_per_s"]),
                     f"{x['peak_bytes'] / GIB:.2f}", f"{100 * x['mfu']:.1f}%",
                     "n/a" if x.get("mfu_published") is None else f"{100 * x['mfu_published']:.1f}%"])
    table = common.markdown_table(
        ["layout", "row tokens", "micro-batches", "computed tokens", "compile s", "old log-prob s",
         "update s", "useful tokens/s", "peak GiB", "MFU (useful)", "MFU (published peak)"], rows)
    timing = (f"Times: the fastest of {c['repeats']} runs (first run "
              + ", ".join(f"{n} {common.fmt(x['first_run_s'])} s" for n, x in r["results"].items())
              + ")." if c.get("repeats", 1) > 1 else "Times: one run after compilation.")
    lines = [
        f"## train_throughput on {env['backend']} ({env['device_kind']}, jax {env['jax']})", "",
        f"{c['preset']} ({c['num_params'] / 1e6:.0f}M params), {c['samples']} samples, "
        f"{c['max_len']}-token maximum (prompt <= {c['prompt_len']}), {c['dtype']}, "
        f"remat={c['remat']}; padded attention {c['padded_attention']!r}, packed "
        f"{c.get('packed_attention', 'blockwise')!r}; a micro-batch holds "
        f"{c.get('micro_rows', 1)} x {c['max_len']} tokens.",
        f"response lengths: mean {L['mean']:.0f}, median {L['median']:.0f}, p90 {L['p90']:.0f}, "
        f"max {L['max']} of {L['max_response']}, {100 * L['truncated']:.0f}% truncated at the "
        f"maximum; {r['useful_tokens']:,} useful (prompt + response) tokens.", "", table, "",
        ("" if r["ratio"] is None else f"packed / padded useful tokens/s: {r['ratio']:.2f}x. ")
        + f"{timing} MFU counts the useful tokens' forward "
        f"(old log-probs) and forward + backward (update) FLOPs against this machine's measured "
        f"{c['dtype']} matmul peak ({r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s)"
        + ("" if not spec else f" and the published bf16 dense peak of the {spec['name']} "
           f"({spec['peak_bf16_flops'] / 1e12:.0f} TFLOP/s)")
        + ". Peak GiB: the largest compiled program's arguments + unaliased outputs + temporaries."]
    if r["memory_scaling"]:
        by = {}
        for m in r["memory_scaling"]:
            by.setdefault(m["row_length"], {})[m["attention"]] = m["temp_bytes"]
        mem_rows = [[n, f"{v.get('blockwise', 0) / GIB:.3f}", f"{v.get('dense', 0) / GIB:.3f}"]
                    for n, v in sorted(by.items())]
        lines += ["", "Compiled temporaries of one packed gradient step, one row:", "",
                  common.markdown_table(["row tokens", "blockwise GiB", "dense GiB"], mem_rows)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the report, writes JSON when asked; returns the results."""
    args = parse_args(argv)
    result = run(args)
    print(format_report(result))
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
