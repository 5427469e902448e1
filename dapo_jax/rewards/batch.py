"""Score many responses at once, in worker processes when the batch is large, keeping input order.

Scorers are chosen by name so configs can pick one (`reward.scorer = "math_dapo"`), and
`boxed_fallback=True` asks for verl's later `\\boxed{}` fallback (`reward.boxed_fallback`).
Workers are started with the "spawn" method: forking a parent that has initialised JAX (threads,
device handles) is unsafe. As with any spawn pool, call this from code under
`if __name__ == "__main__":`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dapo_jax.rewards import math_dapo, symbolic
from dapo_jax.rewards.math_dapo import ScoreResult

ScoreFn = Callable[..., ScoreResult]


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A registered scorer: the function, how much of a response it reads, when to parallelise."""

    fn: ScoreFn
    # Responses are cut to this many trailing characters before being shipped to workers; None
    # ships them whole. Only safe when `fn` itself reads no more than that tail.
    tail_chars: int | None
    # Batches smaller than this are scored inline: starting workers costs about a second.
    min_parallel: int
    # Responses without an `Answer:` line but with a `\boxed{}`: "optional" = `fn` takes a
    # `boxed_fallback=` keyword (off by default), "always" = `fn` reads the box anyway, "never".
    boxed_fallback: str = "never"


BOXED_FALLBACK_KINDS = ("optional", "always", "never")


_SCORERS: dict[str, Scorer] = {
    # ~30 us per sample: inline is faster than a pool until batches are very large.
    "math_dapo": Scorer(math_dapo.compute_score, math_dapo.TAIL_CHARS, min_parallel=16384,
                        boxed_fallback="optional"),
    # Milliseconds to seconds per sample (sympy): worth a pool early.
    "math_verify": Scorer(symbolic.compute_score, symbolic.TAIL_CHARS, min_parallel=64,
                          boxed_fallback="always"),
}


def register_scorer(
    name: str,
    fn: ScoreFn,
    *,
    tail_chars: int | None = None,
    min_parallel: int = 256,
    boxed_fallback: str = "never",
) -> None:
    """Make `fn(response, ground_truth, **kw) -> {"score","acc","pred"}` selectable by `name`.

    `boxed_fallback` says how `fn` treats a `\\boxed{}` with no `Answer:` line (see `Scorer`).
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"scorer name must be a non-empty string, got {name!r}")
    if name in _SCORERS:
        raise ValueError(f"a scorer named {name!r} is already registered; pick another name")
    if not callable(fn):
        raise TypeError(f"scorer {name!r}: fn must be callable, got {type(fn).__name__}")
    if boxed_fallback not in BOXED_FALLBACK_KINDS:
        raise ValueError(
            f"scorer {name!r}: boxed_fallback must be one of {BOXED_FALLBACK_KINDS}, "
            f"got {boxed_fallback!r}"
        )
    # Workers receive `fn` by pickled reference, so it must be importable (module-level).
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ValueError(
            f"scorer {name!r}: fn must be a module-level function so worker processes can "
            f"import it ({error})"
        ) from None
    _SCORERS[name] = Scorer(fn, tail_chars, min_parallel, boxed_fallback)


def available_scorers() -> list[str]:
    """Names accepted by `score_batch(..., scorer=name)`."""
    return sorted(_SCORERS)


def get_scorer(name: str) -> Scorer:
    """The registered scorer called `name`; the error lists the valid names."""
    try:
        return _SCORERS[name]
    except KeyError:
        raise ValueError(
            f"unknown scorer {name!r}; choose one of {available_scorers()}"
        ) from None


def _score_chunk(
    fn: ScoreFn, pairs: Sequence[tuple[str, str | int]], kwargs: Mapping[str, Any]
) -> list[ScoreResult]:
    return [fn(response, truth, **kwargs) for response, truth in pairs]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not every platform has affinity masks
        return os.cpu_count() or 1


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str | int],
    *,
    scorer: str = "math_dapo",
    num_workers: int | None = None,
    min_parallel: int | None = None,
    scorer_kwargs: Mapping[str, Any] | None = None,
    boxed_fallback: bool = False,
) -> list[ScoreResult]:
    """Score `responses[i]` against `ground_truths[i]`; one result dict per response, in order.

    Batches of at least `min_parallel` responses (default: the scorer's own threshold) run in
    `num_workers` spawned processes (default: the usable CPUs), in contiguous chunks.
    `boxed_fallback=True` scores a response with no `Answer:` line by its last `\\boxed{}` (verl
    >= 0.9.1); False keeps the scorer's own rule (math_dapo: the DAPO paper's, no fallback;
    math_verify falls back either way).
    """
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"responses and ground_truths must have the same length, "
            f"got {len(responses)} and {len(ground_truths)}"
        )
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"responses[{index}] must be a str, got {type(response).__name__}")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (or None for all CPUs), got {num_workers}")
    spec = get_scorer(scorer)
    kwargs = dict(scorer_kwargs or {})
    if boxed_fallback:
        if spec.boxed_fallback == "never":
            able = sorted(n for n, s in _SCORERS.items() if s.boxed_fallback != "never")
            raise ValueError(
                f"scorer {scorer!r} cannot fall back to \\boxed{{}} answers; pass "
                f"boxed_fallback=False or use one of {able}"
            )
        if spec.boxed_fallback == "optional":
            # A plain bool in a dict: pickles with the chunks for the worker processes.
            kwargs["boxed_fallback"] = True
    threshold = spec.min_parallel if min_parallel is None else min_parallel
    if spec.tail_chars is not None:
        responses = [response[-spec.tail_chars :] for response in responses]
    pairs = list(zip(responses, ground_truths))
    workers = min(num_workers or _usable_cpus(), len(pairs))
    if len(pairs) < max(threshold, 1) or workers <= 1:
        return _score_chunk(spec.fn, pairs, kwargs)

    # A few chunks per worker balances uneven per-sample cost without much pickling overhead.
    chunk_size = math.ceil(len(pairs) / (4 * workers))
    chunks = [pairs[start : start + chunk_size] for start in range(0, len(pairs), chunk_size)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        chunk_results = pool.map(
            _score_chunk, [spec.fn] * len(chunks), chunks, [kwargs] * len(chunks)
        )
        return [result for chunk in chunk_results for result in chunk]
