"""Forward+backward throughput of a policy preset: tokens/s and achieved FLOP/s (MFU).

One step is `jax.value_and_grad` of a DAPO-style clipped token-level policy loss built on
`sequence_logprobs`, with random weights from `init_model` (parameters float32, matmuls in `--dtype`).
Achieved FLOP/s is compared with this machine's own measured matmul peak (bf16 and fp32 `jnp.dot`,
timed in the same run) and, on GPU/TPU, with the published dense bf16 peak of the device.

    python -m benchmarks.model_step                       # Qwen2.5-0.5B, 1 x 256 tokens, CPU-sized
    python -m benchmarks.model_step --batch 16 --seq_len 2048 --steps 20 --remat dots   # GPU/TPU
    python -m benchmarks.model_step --smoke               # tiny preset, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs.base import get_base_config
from dapo_jax import experiment, models
from dapo_jax.runtime.devices import device_spec
from dapo_jax.models.config import DTYPES, REMAT_POLICIES, ModelConfig

# DAPO's decoupled clip range (Clip-Higher): ratio clipped to [1 - 0.2, 1 + 0.28].
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
_FLOP_NOTE = "FLOPs/token (fwd+bwd) = 3 x cfg.flops_per_token(seq_len) (backward = 2 x forward)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring for example invocations)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b", help="model size preset (models.PRESETS)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="matmul/activation dtype")
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES, help="per-layer remat policy")
    p.add_argument("--matmul_n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 2048 on CPU, "
                        "8192 on GPU/TPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, 2 x 32 tokens, 2 steps: checks the benchmark runs, in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq_len, args.steps, args.warmup = "tiny", 2, 32, 2, 1
        args.matmul_n = 256
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        p.error("--seq_len must be >= 2: the loss predicts token t from tokens before it")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.matmul_n is None:
        args.matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
    return args


def dapo_policy_loss(params: dict, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                     response_mask: jax.Array, old_logprobs: jax.Array, advantages: jax.Array
                     ) -> jax.Array:
    """Token-mean clipped surrogate (DAPO Eq. 8 shape): -min(r A, clip(r, 1-el, 1+eh) A) over tokens."""
    logprobs, _ = models.sequence_logprobs(params, cfg, input_ids, attention_mask, response_mask)
    ratio = jnp.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
    mask = response_mask.astype(jnp.float32)
    return -jnp.sum(surrogate * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> dict[str, jax.Array]:
    """Random token ids; the first quarter of each row is prompt, the rest response."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq_len), dtype=np.int32)
    response = np.zeros((batch, seq_len), np.int32)
    response[:, max(1, seq_len // 4):] = 1
    # Random-init logits are near uniform, so -log(V) (plus noise) keeps the ratio near 1, inside the
    # clip range, like a real on-policy step.
    old = -math.log(cfg.vocab_size) + 0.05 * rng.standard_normal((batch, seq_len))
    adv = rng.choice([-1.0, 1.0], size=(batch,))
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq_len), jnp.int32),
            "response_mask": jnp.asarray(response),
            "old_logprobs": jnp.asarray(old, jnp.float32), "advantages": jnp.asarray(adv, jnp.float32)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compiles and times the gradient step and the reference matmuls; returns every number."""
    # The ModelConfig a training run of this preset gets (experiment builder), with the published
    # vocabulary (no tokenizer here) and the benchmark's dtype / remat.
    config = get_base_config()
    config.model.preset = args.preset
    config.model.vocab_size = models.preset(args.preset).vocab_size
    config.model.dtype, config.model.remat, config.model.param_dtype = args.dtype, args.remat, "float32"
    cfg = experiment.resolve_model_config(config)
    params = models.init_model(cfg, seed=0).params()
    batch = make_batch(cfg, args.batch, args.seq_len)

    def loss_fn(p, b):
        return dapo_policy_loss(p, cfg, b["input_ids"], b["attention_mask"], b["response_mask"],
                                b["old_logprobs"], b["advantages"])

    compiled, compile_s = common.timed(
        lambda: jax.jit(jax.value_and_grad(loss_fn)).lower(params, batch).compile())
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, batch))
    times = []
    for _ in range(args.steps):
        (loss, _), seconds = common.timed(lambda: compiled(params, batch))
        times.append(seconds)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"loss is {float(loss)}: the step is broken, its timing meaningless")

    tokens = args.batch * args.seq_len
    step = common.summarize(times)
    fwd_per_token = cfg.flops_per_token(args.seq_len)
    flops_per_token = 3.0 * fwd_per_token
    achieved = flops_per_token * tokens / step["median"]
    shape_count = common.forward_flops_per_token(cfg, args.seq_len / 2)

    env = common.environment()
    peaks = []
    for dt in ("bfloat16", "float32"):
        peak = common.measured_matmul_flops(dt, args.matmul_n)
        peaks.append({"reference": f"measured {dt} jnp.dot {args.matmul_n}^3", "peak_flops": peak,
                      "ratio": achieved / peak})
    spec = device_spec(env["device_kind"]) if env["backend"] != "cpu" else None
    device = spec.name if spec else env["device_kind"]
    peaks.append({"reference": f"published bf16 dense peak ({device})",
                  "peak_flops": spec.peak_bf16_flops if spec else None,
                  "ratio": achieved / spec.peak_bf16_flops if spec else None})
    return {
        "benchmark": "model_step", "environment": env,
        "config": {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
                   "dtype": args.dtype, "param_dtype": "float32", "remat": args.remat,
                   "steps": args.steps, "warmup": args.warmup, "num_params": cfg.num_params},
        "loss": float(loss), "compile_s": compile_s, "step_s": step, "tokens_per_step": tokens,
        "tokens_per_s": tokens / step["median"], "forward_flops_per_token": fwd_per_token,
        "flops_per_token": flops_per_token, "flops_note": _FLOP_NOTE,
        "shape_count_forward_flops_per_token": shape_count,
        "achieved_flops": achieved, "peaks": peaks,
    }


def format_report(r: dict[str, Any]) -> str:
    """The two markdown tables (step, peaks) and the notes that say how the numbers were counted."""
    c, env = r["config"], r["environment"]
    step = common.markdown_table(
        ["preset", "params", "batch", "seq_len", "dtype", "remat", "compile s", "step s (median)",
         "tokens/s", "achieved TFLOP/s"],
        [[c["preset"], f"{c['num_params'] / 1e6:.1f}M", c["batch"], c["seq_len"], c["dtype"],
          c["remat"], common.fmt(r["compile_s"]), common.fmt(r["step_s"]["median"]),
          common.fmt(r["tokens_per_s"]), common.fmt(r["achieved_flops"] / 1e12)]])
    peaks = common.markdown_table(
        ["reference", "peak TFLOP/s", "MFU (achieved / peak)"],
        [[p["reference"], common.fmt(None if p["peak_flops"] is None else p["peak_flops"] / 1e12),
          "n/a" if p["ratio"] is None else f"{100 * p['ratio']:.1f}%"] for p in r["peaks"]])
    lines = [f"## model_step on {env['backend']} ({env['device_kind']}, jax {env['jax']})", "",
             step, "", peaks, "",
             f"{r['flops_note']}; forward = {common.fmt(r['forward_flops_per_token'])} FLOP/token.",
             f"Step time over {c['steps']} steps after {c['warmup']} warm-up: median "
             f"{common.fmt(r['step_s']['median'])} s, min {common.fmt(r['step_s']['min'])} s, "
             f"max {common.fmt(r['step_s']['max'])} s; compile time is excluded from them."]
    shape = r["shape_count_forward_flops_per_token"]
    excess = r["forward_flops_per_token"] / shape - 1
    if abs(excess) > 0.01:
        lines.append(
            f"Warning: cfg.flops_per_token is {100 * excess:+.1f}% off a count from the layer shapes "
            f"({common.fmt(shape)} FLOP/token forward); with that count the achieved rate is "
            f"{common.fmt(r['achieved_flops'] / (1 + excess) / 1e12)} TFLOP/s.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the markdown report, writes JSON when asked; returns the results."""
    args = parse_args(argv)
    result = run(args)
    print(format_report(result))
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
