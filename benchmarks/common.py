"""Shared pieces of the benchmarks: device peak tables, a measured matmul peak, FLOP counts, timing
and markdown/JSON output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax.models.config import ModelConfig


def environment() -> dict[str, Any]:
    """What the numbers were measured on: backend, device kind and count, library versions."""
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "jax": jax.__version__, "jaxlib": _version("jaxlib"),
            "flax": _version("flax"), "python": platform.python_version()}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def forward_flops_per_token(cfg: ModelConfig, attended_keys: float) -> float:
    """Forward FLOPs (2 per multiply-add) of one token that attends to `attended_keys` keys.

    Counted from the layer shapes: q/k/v/o and the three MLP projections in every layer, the lm head
    once (the embedding lookup is not a matmul, tied or not), and Q.K^T plus P.V attention.
    """
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, k = cfg.num_heads, cfg.num_kv_heads
    per_layer_macs = d * (h + 2 * k) * hd + h * hd * d + 3 * d * f
    attention_macs = 2 * h * hd * attended_keys
    return 2.0 * (cfg.num_layers * (per_layer_macs + attention_macs) + d * cfg.vocab_size)


def measured_matmul_flops(dtype: str, n: int, reps: int = 5) -> float:
    """Best FLOP/s of an [n, n] @ [n, n] `jnp.dot` in `dtype` on the default device (no compile)."""
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dt)
    b = jax.random.normal(kb, (n, n), dt)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(dot(a, b))
    best = min(timed(lambda: dot(a, b))[1] for _ in range(reps))
    return 2.0 * n ** 3 / best


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Calls `fn`, waits for every array it returns, and returns (result, seconds)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and standard deviation of a list of timings."""
    s = np.asarray(seconds, np.float64)
    return {"median": float(np.median(s)), "mean": float(s.mean()), "min": float(s.min()),
            "max": float(s.max()), "std": float(s.std())}


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with `digits` significant digits (plain notation where short), or 'n/a' for None."""
    if x is None:
        return "n/a"
    if 10 ** (digits - 1) <= abs(x) < 1e6:
        return f"{x:.0f}"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:#.{digits}g}".rstrip(".")
    return f"{x:.{digits - 1}e}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; cells are str()-ed and columns padded to line up."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells, the header has {len(headers)}")
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def table_headers(text: str) -> list[list[str]]:
    """The header cells of every markdown table in `text` (a '|' line followed by a '|---' line)."""
    lines = text.splitlines()
    return [[c.strip() for c in head.strip().strip("|").split("|")]
            for head, below in zip(lines, lines[1:])
            if head.startswith("|") and below.startswith("|-")]


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Writes `payload` as indented JSON, creating the parent folder."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
        f.write("\n")
