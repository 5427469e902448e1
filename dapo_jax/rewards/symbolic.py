"""Opt-in scorer that also accepts symbolically equal answers (`0.5` for `\\frac{1}{2}`).

Equivalence is decided by math-verify.

Meant for MATH-500-style evaluation with non-integer answers; DAPO training keeps the strict
`math_dapo` rule. A response is correct when DAPO's rule accepts it, or when math-verify finds its
answer equal to the ground truth. The answer is the last `Answer:` line of the final 300 characters,
or else the last `\\boxed{}` there. Each sample gets a wall-clock budget (`timeout_s`); a sample
that exceeds it scores -1.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from types import ModuleType

from dapo_jax.rewards import math_dapo
from dapo_jax.rewards.math_dapo import INVALID, ScoreResult

TAIL_CHARS = math_dapo.TAIL_CHARS
DEFAULT_TIMEOUT_S = 5.0


class SampleTimeout(BaseException):
    """Raised inside math-verify when a sample's budget runs out.

    A BaseException so that math-verify's broad `except Exception` handlers cannot swallow it.
    """


class _DropDisabledTimeoutWarning(logging.Filter):
    # We turn math-verify's own integer-second alarms off (they would cancel our timer, which
    # shares SIGALRM) and enforce a deadline ourselves, so its warning about that is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_logging_configured = False
_thread_warning_shown = False


def _configure_math_verify_logging() -> None:
    global _logging_configured
    if not _logging_configured:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
        _logging_configured = True


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise SampleTimeout in the body after `seconds` (main thread only; elsewhere no limit)."""
    global _thread_warning_shown
    if threading.current_thread() is not threading.main_thread():
        if not _thread_warning_shown:
            warnings.warn(
                "math_verify scorer called off the main thread: signals cannot interrupt it there, "
                "so the per-sample timeout is not enforced. Use score_batch(..., num_workers>1) "
                "or call it from the main thread.",
                RuntimeWarning,
                stacklevel=3,
            )
            _thread_warning_shown = True
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise SampleTimeout(f"sample exceeded its {seconds} s budget")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            # Nested so the handler is restored even if the alarm lands just as the body ends.
            signal.signal(signal.SIGALRM, previous_handler)
            if previous_delay > 0:
                # Give back whatever timer the caller had running, minus the time we spent.
                remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


def extract_candidate(solution_str: str) -> str | None:
    """The answer text a response commits to: last `Answer:` line, else last `\\boxed{}` content."""
    tail = solution_str[-TAIL_CHARS:]
    answer = math_dapo.extract_answer(tail)
    if answer != INVALID:
        return answer
    boxed = math_dapo.last_boxed(tail)
    return boxed[len("\\boxed{") : -1] if boxed is not None else None


def _symbolically_equal(candidate: str, ground_truth: str, timeout_s: float) -> bool:
    # Imported here, outside the deadline: sympy and the LaTeX grammar take ~1 s to load, which
    # DAPO training never needs, and an import must not be interrupted halfway.
    import math_verify

    _configure_math_verify_logging()
    try:
        with _deadline(timeout_s):
            return _parse_and_verify(math_verify, candidate, ground_truth)
    except SampleTimeout:
        return False


def _parse_and_verify(math_verify: ModuleType, candidate: str, ground_truth: str) -> bool:
    parse, verify = math_verify.parse, math_verify.verify
    config = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
    # Both sides are wrapped as inline math so math-verify reads them as one LaTeX expression.
    gold = parse(f"${ground_truth}$", extraction_config=config, parsing_timeout=None)
    pred = parse(f"${candidate.replace('$', '')}$", extraction_config=config, parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def compute_score(
    solution_str: str, ground_truth: str | int, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ScoreResult:
    """Score like `math_dapo`, but also accept answers math-verify finds equal within `timeout_s`."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    exact = math_dapo.compute_score(solution_str, ground_truth)
    if exact["acc"]:
        return exact
    candidate = extract_candidate(solution_str)
    if candidate is None or not candidate.strip():
        return exact
    correct = _symbolically_equal(candidate, str(ground_truth), timeout_s)
    # The prediction stays Minerva-normalised so majority votes group answers the same way.
    pred = math_dapo.normalize_final_answer(candidate)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
