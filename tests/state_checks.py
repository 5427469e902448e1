"""Exact comparisons of training state and metrics, shared by the resume, preemption and path tests.

A resumed run must be the uninterrupted run, not close to it: a dropped optimizer moment moved a
logged metric by only 4e-5, well inside any tolerance, while it changes the moments' bits.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from dapo_jax.runtime.host_transfer import tree_to_host

# Keys whose values depend on wall-clock time, not on the computation.
TIMING_PREFIXES = ("timing_s/", "perf/")


def host_state(trainer) -> dict[str, Any]:
    """Host (numpy) copies of a trainer's parameters and optimizer state."""
    return {"params": tree_to_host(trainer.params), "opt_state": tree_to_host(trainer.opt_state)}


def bitwise_differences(want: Any, have: Any) -> list[str]:
    """Every leaf of two pytrees whose dtype, shape or bytes differ (empty = bit-identical)."""
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    have_leaves, have_def = jax.tree_util.tree_flatten_with_path(have)
    if want_def != have_def:
        return [f"tree structures differ:\n  {want_def}\n  {have_def}"]
    problems = []
    for (path, w), (_, h) in zip(want_leaves, have_leaves):
        w, h = np.asarray(w), np.asarray(h)
        name = jax.tree_util.keystr(path)
        if w.dtype != h.dtype or w.shape != h.shape:
            problems.append(f"{name}: {w.dtype}{list(w.shape)} vs {h.dtype}{list(h.shape)}")
        elif w.tobytes() != h.tobytes():
            diff = np.abs(w.astype(np.float64) - h.astype(np.float64))
            problems.append(f"{name}: {int(np.sum(w != h))} of {w.size} values differ, max "
                            f"|difference| {np.nanmax(diff) if diff.size else 0:.3g}")
    return problems


def assert_bitwise_equal(want: Any, have: Any) -> None:
    """Fails, naming every differing leaf, unless the two pytrees are bit-identical."""
    problems = bitwise_differences(want, have)
    assert not problems, "\n".join(problems)


def comparable(metrics: Mapping[str, float]) -> dict[str, float]:
    """A metrics record without its wall-clock entries."""
    return {k: v for k, v in metrics.items()
            if not (k.startswith(TIMING_PREFIXES) or "/timing_s/" in k or k.endswith("tokens_per_s"))}


def assert_metrics_equal(want: Mapping[str, float], have: Mapping[str, float]) -> None:
    """The same keys and exactly the same values, wall-clock entries aside."""
    want, have = comparable(want), comparable(have)
    assert want.keys() == have.keys(), (sorted(want.keys() - have.keys()),
                                        sorted(have.keys() - want.keys()))
    differ = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
    assert not differ, differ
