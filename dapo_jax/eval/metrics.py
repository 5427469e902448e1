"""Evaluation metrics over several sampled answers per problem: avg@k, pass@k, maj@k, best/worst@k.

Input everywhere is one list per problem of `(acc, pred)` samples: whether the sample was judged
correct and its normalised prediction (the reward's "pred"), in generation order.

- avg@k: mean accuracy of each problem's first k samples, averaged over problems. DAPO's AIME
  headline is avg@32 (called `mean@32` by verl).
- pass@k: unbiased estimate of P(at least one of k samples is correct), 1 - C(n-c, k) / C(n, k)
  (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1).
- best@k / worst@k / maj@k: verl's bootstrap estimates (`process_validation_metrics`): for each
  problem, 1000 draws of k sample indices (with replacement, numpy's legacy generator reseeded to
  42 for every statistic), reduced by max / min / majority vote, then mean and std over the draws;
  finally averaged over problems. The numbers match verl's for the same samples.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Sample = tuple[bool, str]
ProblemSamples = Sequence[Sample]

N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 42


def k_values(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... below n, then n itself (verl's choice)."""
    if n < 1:
        raise ValueError(f"need at least one sample per problem, got n={n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct out of n samples: 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}]; pass@k needs at least k samples")
    if n - c < k:
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i): a product of terms in (0, 1), no overflow.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_problems(problems: Sequence[ProblemSamples]) -> None:
    if len(problems) == 0:
        raise ValueError("no problems given: pass one list of (acc, pred) samples per problem")
    for index, samples in enumerate(problems):
        if len(samples) == 0:
            raise ValueError(f"problem #{index} has no samples; drop it or generate some")
        for acc, pred in samples:
            if not isinstance(acc, (bool, np.bool_)) or not isinstance(pred, str):
                raise TypeError(
                    f"problem #{index}: samples must be (acc: bool, pred: str), "
                    f"got ({type(acc).__name__}, {type(pred).__name__})"
                )


def _min_samples(problems: Sequence[ProblemSamples], k: int) -> None:
    fewest = min(len(samples) for samples in problems)
    if k > fewest:
        raise ValueError(f"k={k} exceeds the {fewest} samples of the smallest problem")


def avg_at_k(problems: Sequence[ProblemSamples], k: int) -> float:
    """Mean accuracy over the first k samples of each problem, averaged over problems."""
    _check_problems(problems)
    _min_samples(problems, k)
    return float(np.mean([np.mean([bool(acc) for acc, _ in samples[:k]]) for samples in problems]))


def mean_pass_at_k(problems: Sequence[ProblemSamples], k: int) -> float:
    """Unbiased pass@k of each problem (from all its samples), averaged over problems."""
    _check_problems(problems)
    _min_samples(problems, k)
    return float(
        np.mean([pass_at_k(len(s), sum(bool(acc) for acc, _ in s), k) for s in problems])
    )


def majority_vote(preds: Sequence[str]) -> str:
    """The most frequent prediction; ties go to the one that appears first."""
    if len(preds) == 0:
        raise ValueError("majority_vote needs at least one prediction")
    counts: dict[str, int] = {}
    for pred in preds:
        counts[pred] = counts.get(pred, 0) + 1
    # max() returns the first maximal key, and dicts keep first-appearance order.
    return max(counts, key=counts.__getitem__)


@functools.lru_cache(maxsize=256)
def _bootstrap_indices(n_items: int, subset_size: int, n_bootstrap: int, seed: int) -> np.ndarray:
    # One draw per call, as verl does, so the index stream is identical to its
    # `np.random.seed(seed); np.random.choice(n_items, size=subset_size, replace=True)` loop.
    rng = np.random.RandomState(seed)
    draws = np.stack(
        [rng.choice(n_items, size=subset_size, replace=True) for _ in range(n_bootstrap)]
    )
    draws.setflags(write=False)
    return draws


def bootstrap_metric(
    data: Sequence[Any],
    subset_size: int,
    reduce_fns: Sequence[Callable[[list[Any]], float]],
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> list[tuple[float, float]]:
    """(mean, std) over `n_bootstrap` resamples of `subset_size` items, for each reduce function."""
    if len(data) == 0 or subset_size < 1 or n_bootstrap < 1:
        raise ValueError(
            f"bootstrap needs data, subset_size >= 1 and n_bootstrap >= 1; got {len(data)} items, "
            f"subset_size={subset_size}, n_bootstrap={n_bootstrap}"
        )
    indices = _bootstrap_indices(len(data), subset_size, n_bootstrap, seed)
    stats = []
    for reduce_fn in reduce_fns:
        values = np.array([reduce_fn([data[i] for i in row]) for row in indices], dtype=np.float64)
        stats.append((float(values.mean()), float(values.std())))
    return stats


def _bootstrap_best_worst_maj(
    acc: np.ndarray, codes: np.ndarray, subset_size: int, n_bootstrap: int, seed: int
) -> dict[str, float]:
    """Vectorised bootstrap of max, min and majority-vote accuracy over one problem's samples."""
    indices = _bootstrap_indices(len(acc), subset_size, n_bootstrap, seed)
    drawn_acc = acc[indices]
    best, worst = drawn_acc.max(axis=1), drawn_acc.min(axis=1)

    # Majority vote per draw, ties to the prediction drawn first (verl's dict-order rule).
    drawn_codes = codes[indices]
    n_codes = int(codes.max()) + 1
    rows = np.repeat(np.arange(n_bootstrap), subset_size)
    positions = np.tile(np.arange(subset_size), n_bootstrap)
    counts = np.zeros((n_bootstrap, n_codes), dtype=np.int64)
    np.add.at(counts, (rows, drawn_codes.ravel()), 1)
    first_seen = np.full((n_bootstrap, n_codes), subset_size, dtype=np.int64)
    np.minimum.at(first_seen, (rows, drawn_codes.ravel()), positions)
    winner = np.argmax(counts * (subset_size + 1) + (subset_size - first_seen), axis=1)
    winner_position = first_seen[np.arange(n_bootstrap), winner]
    majority = drawn_acc[np.arange(n_bootstrap), winner_position]

    return {
        f"best@{subset_size}/mean": float(best.mean()),
        f"best@{subset_size}/std": float(best.std()),
        f"worst@{subset_size}/mean": float(worst.mean()),
        f"worst@{subset_size}/std": float(worst.std()),
        f"maj@{subset_size}/mean": float(majority.mean()),
        f"maj@{subset_size}/std": float(majority.std()),
    }


def problem_bootstrap_metrics(
    samples: ProblemSamples, n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """verl's per-prompt accuracy metrics: mean@n, std@n and best/worst/maj@k (mean, std)."""
    _check_problems([samples])
    acc = np.array([bool(a) for a, _ in samples], dtype=np.float64)
    n = len(acc)
    metrics = {f"mean@{n}": float(acc.mean())}
    if n == 1:
        return metrics
    metrics[f"std@{n}"] = float(acc.std())
    first_index: dict[str, int] = {}
    codes = np.array([first_index.setdefault(p, len(first_index)) for _, p in samples])
    for k in k_values(n)[1:]:
        metrics.update(_bootstrap_best_worst_maj(acc, codes, k, n_bootstrap, seed))
    return metrics


def bootstrap_accuracy_metrics(
    problems: Sequence[ProblemSamples], n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """Per-problem verl metrics averaged over the problems that have each metric."""
    _check_problems(problems)
    per_name: dict[str, list[float]] = {}
    for samples in problems:
        for name, value in problem_bootstrap_metrics(samples, n_bootstrap, seed).items():
            per_name.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in per_name.items()}


def verl_section(metric_names: Sequence[str], name: str, is_core_var: bool = True) -> str:
    """"val-core" or "val-aux" for a metric of the core variable, by verl's rule.

    Core: the mean/maj/best statistics at the largest sample count present.
    """
    n_max = max(int(other.split("@")[-1].split("/")[0]) for other in metric_names if "@" in other)
    core = is_core_var and name.startswith(("mean", "maj", "best")) and f"@{n_max}" in name
    return "val-core" if core else "val-aux"


def response_length_stats(
    lengths: Sequence[int],
    finish_reasons: Sequence[str] | None = None,
    max_length: int | None = None,
) -> dict[str, float]:
    """Mean/min/max/std response length and the fraction truncated ("clip_ratio").

    Truncated means finish_reason == "length" when finish reasons are given, else a length of at
    least `max_length`; without either, no clip_ratio is reported.
    """
    if len(lengths) == 0:
        raise ValueError("response_length_stats needs at least one length")
    values = np.asarray(lengths, dtype=np.float64)
    if np.any(values < 0):
        raise ValueError("response lengths must be >= 0 (token counts)")
    stats = {
        "mean": float(values.mean()),
        "max": float(values.max()),
        "min": float(values.min()),
        "std": float(values.std()),
    }
    if finish_reasons is not None:
        if len(finish_reasons) != len(lengths):
            raise ValueError(
                f"finish_reasons has {len(finish_reasons)} entries but lengths has {len(lengths)}"
            )
        stats["clip_ratio"] = float(np.mean([reason == "length" for reason in finish_reasons]))
    elif max_length is not None:
        stats["clip_ratio"] = float(np.mean(values >= max_length))
    return stats


def evaluation_metrics(
    problems: Sequence[ProblemSamples],
    dataset: str,
    *,
    lengths: Sequence[int] | None = None,
    finish_reasons: Sequence[str] | None = None,
    max_length: int | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
    """All metrics under logging names: verl's `val-core/<dataset>/acc/mean@32` etc., plus ours.

    Ours are `val-aux/<dataset>/acc/avg@k` and `val-aux/<dataset>/acc/pass@k` for k in
    `k_values(n)` of the smallest problem, and `val-aux/<dataset>/response_length/<stat>`.
    """
    if not dataset or "/" in dataset:
        raise ValueError(f"dataset must be a non-empty name without '/', got {dataset!r}")
    _check_problems(problems)
    verl_metrics = bootstrap_accuracy_metrics(problems, n_bootstrap, seed)
    names = list(verl_metrics)
    metrics = {
        f"{verl_section(names, name)}/{dataset}/acc/{name}": value
        for name, value in verl_metrics.items()
    }
    for k in k_values(min(len(samples) for samples in problems)):
        metrics[f"val-aux/{dataset}/acc/avg@{k}"] = avg_at_k(problems, k)
        metrics[f"val-aux/{dataset}/acc/pass@{k}"] = mean_pass_at_k(problems, k)
    if lengths is not None:
        for stat, value in response_length_stats(lengths, finish_reasons, max_length).items():
            metrics[f"val-aux/{dataset}/response_length/{stat}"] = value
    return metrics


def headline(metrics: Mapping[str, float], dataset: str) -> dict[str, float]:
    """The few numbers people quote: avg@n, maj@n and pass@n at the largest n, keyed short."""
    prefix = f"/{dataset}/acc/"
    n = max(int(name.rsplit("@", 1)[1]) for name in metrics if f"{prefix}avg@" in name)
    picked = {f"avg@{n}": metrics[f"val-aux{prefix}avg@{n}"]}
    for section in ("val-core", "val-aux"):
        if f"{section}{prefix}maj@{n}/mean" in metrics:
            picked[f"maj@{n}"] = metrics[f"{section}{prefix}maj@{n}/mean"]
    picked[f"pass@{n}"] = metrics[f"val-aux{prefix}pass@{n}"]
    return picked
