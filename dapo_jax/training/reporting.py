"""What a training step reports: verl's metric names, and the console lines of `make demo`."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def batch_metrics(batch: Mapping[str, np.ndarray], *, overlong_filter: bool) -> dict[str, float]:
    """Reward, advantage and length statistics of the training batch (verl's `critic/`, ...)."""
    lengths = batch["length"].astype(np.float64)
    adv, truncated = batch["advantages"], batch["truncated"].astype(bool)
    return {
        "critic/score/mean": float(batch["score"].mean()),
        "critic/score/max": float(batch["score"].max()),
        "critic/score/min": float(batch["score"].min()),
        "critic/acc/mean": float(batch["acc"].mean()),
        "critic/advantages/mean": float(adv.mean()),
        "critic/advantages/max": float(adv.max()),
        "critic/advantages/min": float(adv.min()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float(truncated.mean()),
        "train/overlong_filtered": float(truncated.sum()) if overlong_filter else 0.0,
        "train/num_samples": float(lengths.shape[0]),
    }


def throughput_metrics(*, timing: Mapping[str, float], decode_tokens: float, train_tokens: float,
                       flops_per_token: float, peak_flops: float, num_devices: int
                       ) -> dict[str, float]:
    """Rollout and training tokens/s, and MFU of the update when the device peak is known."""
    update_s = max(timing["update_actor"], 1e-9)
    m = {"perf/rollout_tokens_per_s": decode_tokens / max(timing["gen"], 1e-9),
         "perf/train_tokens_per_s": train_tokens / update_s}
    if peak_flops:
        m["perf/mfu"] = 3 * train_tokens * flops_per_token / update_s / (peak_flops * num_devices)
    return m


def format_step(step: int, total: int, m: Mapping[str, float]) -> str:
    """One console line per training step."""
    acc = m.get("train/acc_before_filter")
    return (f"step {step}/{total} | score {m['critic/score/mean']:+.3f} | acc(before filter) "
            f"{'  n/a' if acc is None else f'{acc:.3f}'} | len {m['response_length/mean']:.1f} | "
            f"entropy {m.get('actor/entropy', 0):.3f} | clipfrac {m.get('actor/pg_clipfrac', 0):.4f} | "
            f"kl {m.get('actor/ppo_kl', 0):+.5f} | grad {m.get('actor/grad_norm', 0):.3f} | "
            f"gen batches {m.get('train/num_gen_batches', 0):.0f} | {m['timing_s/step']:.1f}s")


def format_validation(step: int, m: Mapping[str, float]) -> str:
    """One console line per validation: every dataset's headline mean@n."""
    parts = [f"{k.split('/')[1]} {k.split('/')[-1]}={v:.3f}" for k, v in sorted(m.items())
             if k.startswith("val-core") and "/acc/mean@" in k]
    return f"validation @ step {step}: " + ", ".join(parts)
