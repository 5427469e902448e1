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
from dapo_jax.models.attention import resolve_attention
from dapo_jax.models.config import DTYPES, REMAT_POLICIES, ModelConfig

# DAPO's decoupled clip range (Clip-Higher): ratio clipped to [1 - 0.2, 1 + 0.28].
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
_FLOP_NOTE = ("FLOPs (fwd+bwd) = 3 x forward (backward = 2 x forward); forward = "
              "cfg.flops_per_token(sample length) per token without the lm head, whose 2 x vocab x "
              "hidden FLOPs count only for the scored (response) tokens it computes")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring for example invocations)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b", help="model size preset (models.PRESETS)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--samples_per_row", type=int, default=1,
                   help="packed rows: this many samples of random lengths end to end in each row "
                        "(segment ids, positions restarting per sample), as the trainer packs them")
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
    if not 1 <= args.samples_per_row <= args.seq_len // 4:
        p.error(f"--samples_per_row must be in [1, --seq_len / 4 = {args.seq_len // 4}] (a sample "
                f"needs at least 4 tokens), got {args.samples_per_row}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.matmul_n is None:
        args.matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
    return args


def dapo_policy_loss(params: dict, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                     response_mask: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                     ) -> jax.Array:
    """Token-mean clipped surrogate (DAPO Eq. 8 shape): -min(r A, clip(r, 1-el, 1+eh) A) over tokens."""
    logprobs, _ = models.sequence_logprobs(params, cfg, input_ids, attention_mask, response_mask,
                                           positions=positions, segment_ids=segment_ids)
    ratio = jnp.exp(logprobs - old_logprobs)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
    mask = response_mask.astype(jnp.float32)
    return -jnp.sum(surrogate * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def segment_lengths(seq_len: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """`samples` lengths of at least 4 tokens summing to `seq_len` (uniform random cut points)."""
    if samples == 1:
        return np.asarray([seq_len])
    cuts = np.sort(rng.choice(seq_len - 4 * samples + 1, samples - 1, replace=True))
    spare = np.diff(np.concatenate([[0], cuts, [seq_len - 4 * samples]]))
    return spare + 4


def make_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0, samples_per_row: int = 1
               ) -> dict[str, jax.Array]:
    """Random token ids in rows of `samples_per_row` samples each; the first quarter of every
    sample is prompt, the rest response. Packed rows (more than one sample) also carry segment
    ids (1, 2, ... per sample) and positions restarting at 0 in each sample."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq_len), dtype=np.int32)
    response = np.zeros((batch, seq_len), np.int32)
    segments = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    adv = np.zeros((batch, seq_len), np.float32)
    lengths = []
    for b in range(batch):
        start = 0
        for s, n in enumerate(segment_lengths(seq_len, samples_per_row, rng)):
            # A sample's first token is never scored: it would be predicted from the previous one.
            response[b, start + max(1, n // 4):start + n] = 1
            segments[b, start:start + n] = s + 1
            positions[b, start:start + n] = np.arange(n)
            adv[b, start:start + n] = rng.choice([-1.0, 1.0])
            lengths.append(int(n))
            start += n
    # Random-init logits are near uniform, so -log(V) (plus noise) keeps the ratio near 1, inside the
    # clip range, like a real on-policy step.
    old = -math.log(cfg.vocab_size) + 0.05 * rng.standard_normal((batch, seq_len))
    out = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq_len), jnp.int32),
           "response_mask": jnp.asarray(response),
           "old_logprobs": jnp.asarray(old, jnp.float32), "advantages": jnp.asarray(adv)}
    if samples_per_row > 1:
        out.update(positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    return out, np.asarray(lengths)


def step_flops(cfg: ModelConfig, sample_lengths: np.ndarray, scored_tokens: int) -> float:
    """Model FLOPs of one forward + backward (3 x forward): every token through the decoder with
    attention over its own sample (cfg.flops_per_token(sample length)), the lm head (2 x vocab x
    hidden) only for the scored tokens, which are all that `sequence_logprobs` projects."""
    head = 2.0 * cfg.vocab_size * cfg.hidden_size
    body = sum(float(n) * (cfg.flops_per_token(int(n)) - head) for n in sample_lengths)
    return 3.0 * (body + head * scored_tokens)


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
    batch, lengths = make_batch(cfg, args.batch, args.seq_len, samples_per_row=args.samples_per_row)
    scored = int(np.asarray(batch["response_mask"]).sum())

    def loss_fn(p, b):
        return dapo_policy_loss(p, cfg, b["input_ids"], b["attention_mask"], b["response_mask"],
                                b["old_logprobs"], b["advantages"], b.get("positions"),
                                b.get("segment_ids"))

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
    flops_per_step = step_flops(cfg, lengths, scored)
    flops_per_token = flops_per_step / tokens
    achieved = flops_per_step / step["median"]
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
                   "samples_per_row": args.samples_per_row,
                   "attention": resolve_attention(cfg.attention),
                   "dtype": args.dtype, "param_dtype": "float32", "remat": args.remat,
                   "steps": args.steps, "warmup": args.warmup, "num_params": cfg.num_params},
        "loss": float(loss), "compile_s": compile_s, "step_s": step, "tokens_per_step": tokens,
        "scored_tokens": scored, "flops_per_step": flops_per_step,
        "mean_sample_length": float(np.mean(lengths)),
        "tokens_per_s": tokens / step["median"], "forward_flops_per_token": fwd_per_token,
        "flops_per_token": flops_per_token, "flops_note": _FLOP_NOTE,
        "shape_count_forward_flops_per_token": shape_count,
        "achieved_flops": achieved, "peaks": peaks,
    }


def format_report(r: dict[str, Any]) -> str:
    """The two markdown tables (step, peaks) and the notes that say how the numbers were counted."""
    c, env = r["config"], r["environment"]
    step = common.markdown_table(
        ["preset", "params", "batch", "seq_len", "samples/row", "attention", "dtype", "remat",
         "compile s", "step s (median)", "tokens/s", "achieved TFLOP/s"],
        [[c["preset"], f"{c['num_params'] / 1e6:.1f}M", c["batch"], c["seq_len"],
          c["samples_per_row"], c["attention"], c["dtype"],
          c["remat"], common.fmt(r["compile_s"]), common.fmt(r["step_s"]["median"]),
          common.fmt(r["tokens_per_s"]), common.fmt(r["achieved_flops"] / 1e12)]])
    peaks = common.markdown_table(
        ["reference", "peak TFLOP/s", "MFU (achieved / peak)"],
        [[p["reference"], common.fmt(None if p["peak_flops"] is None else p["peak_flops"] / 1e12),
          "n/a" if p["ratio"] is None else f"{100 * p['ratio']:.1f}%"] for p in r["peaks"]])
    lines = [f"## model_step on {env['backend']} ({env['device_kind']}, jax {env['jax']})", "",
             step, "", peaks, "",
             f"{r['flops_note']}. This step: {common.fmt(r['flops_per_step'])} FLOPs "
             f"({common.fmt(r['flops_per_token'])} per token; samples of mean length "
             f"{r['mean_sample_length']:.0f}, {r['scored_tokens']} of {r['tokens_per_step']} tokens "
             f"scored); a one-sample row's forward is {common.fmt(r['forward_flops_per_token'])} "
             "FLOP/token with the head.",
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
