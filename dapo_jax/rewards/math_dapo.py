"""DAPO's rule-based math reward: +1 when the last `Answer:` line matches the ground truth, else -1.

This reproduces, behaviour for behaviour, the reward that DAPO was trained and evaluated with
(verl `verl/utils/reward_score/math_dapo.py`): only the last 300 characters of a response are read,
the answer is the text after the last case-insensitive `Answer:`, and prediction and ground truth are
compared as strings after the Minerva answer normalisation (Lewkowycz et al. 2022, appendix D.1).
It is deliberately strict: `042`, `3.0`, `42.` and `\\dfrac{1}{2}` do not match `42`, `3`, `42` and
`\\frac{1}{2}`. Use `dapo_jax.rewards.symbolic` when symbolic equivalence is wanted.

`boxed_fallback=True` is verl's later rule (verl 0.9.1's `verify`; not in the DAPO release): when
the normalised `Answer:` prediction is "[INVALID]", the raw content of the last `\\boxed{}` in the
final 100 characters is compared with the raw ground truth, as `strict_box_verify` does.
"""
from __future__ import annotations

import functools
import numbers
import re
from typing import TypedDict

# The reference reads only this many trailing characters, which also bounds the time per sample.
TAIL_CHARS = 300
# The strict-box variant looks for `\boxed{}` in this many trailing characters of that tail.
STRICT_BOX_TAIL_CHARS = 100
INVALID = "[INVALID]"

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Minerva's normalisation tables. Order matters: each pair/expression is applied in turn, so e.g.
# spaces are gone before units such as "cm" are stripped.
_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_REMOVED_EXPRESSIONS: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
# (pattern, replacement) rewrites applied in this order after the tables above.
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Keep only the first $...$ span of each line.
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    # Greedy: unwraps from the first \boxed{ to the last } of the line.
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
    # Shorthand TeX: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}.
    (re.compile(r"(frac)([^{])(.)"), r"frac{\2}{\3}"),
    (re.compile(r"(sqrt)([^{])"), r"sqrt{\2}"),
)


class ScoreResult(TypedDict):
    """One scored response: reward (+1/-1), correctness, and the normalised prediction."""

    score: float
    acc: bool
    pred: str


def normalize_final_answer(final_answer: str) -> str:
    """Minerva-normalise an answer string (keep text after the last '=', strip units and TeX)."""
    text = final_answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        text = text.replace(old, new)
    for expression in _REMOVED_EXPRESSIONS:
        text = text.replace(expression, "")
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    text = text.replace("$", "")
    # Thousands separators only go when what is left is a plain integer ("1,000" but not "(1,2)").
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


@functools.lru_cache(maxsize=65536)
def _normalized_ground_truth(ground_truth: str) -> str:
    # Ground truths repeat across the 16-32 samples of a problem, so normalise each once.
    return normalize_final_answer(ground_truth)


def extract_answer(text: str) -> str:
    """The raw text after the last `Answer:` in `text` (to end of line), or "[INVALID]" if none."""
    matches = _ANSWER_LINE.findall(text)
    return matches[-1] if matches else INVALID


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` in `text` with balanced braces, or None when absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for position in range(start, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start : position + 1]
    return None


def _score_minerva(tail: str, ground_truth: str) -> tuple[bool, str]:
    pred = normalize_final_answer(extract_answer(tail))
    return pred == _normalized_ground_truth(ground_truth), pred


def _final_box_content(tail: str) -> str | None:
    """Raw content of the last `\\boxed{}` in the final 100 characters of `tail`, or None."""
    boxed = last_boxed(tail[-STRICT_BOX_TAIL_CHARS:])
    return boxed[len("\\boxed{") : -1] if boxed is not None else None


def _score_strict_box(tail: str, ground_truth: str) -> tuple[bool, str]:
    # The strict variant compares the raw boxed content with the raw ground truth, no normalisation.
    # A missing box is wrong even for the ground truth "[INVALID]" (verl compares None there).
    content = _final_box_content(tail)
    if content is None:
        return False, INVALID
    return content == ground_truth, content


def compute_score(
    solution_str: str,
    ground_truth: str | int,
    strict_box_verify: bool = False,
    boxed_fallback: bool = False,
) -> ScoreResult:
    """DAPO reward of one response: {"score": +1.0/-1.0, "acc": bool, "pred": the answer read}.

    `pred` is the normalised `Answer:` text, or the raw box content when a box decided.
    `strict_box_verify` reads only the last `\\boxed{}`; `boxed_fallback` reads it when there is no
    usable `Answer:` line (verl >= 0.9.1). Both off is the DAPO paper's scorer.
    """
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a str, got {type(solution_str).__name__}")
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, numbers.Integral)):
        raise TypeError(
            f"ground_truth must be a str (or an int answer), got {type(ground_truth).__name__}"
        )
    # Integer answers (AIME files store them as ints) compare as their decimal string.
    truth = str(ground_truth)
    tail = solution_str[-TAIL_CHARS:]
    if strict_box_verify:
        correct, pred = _score_strict_box(tail, truth)
    else:
        correct, pred = _score_minerva(tail, truth)
        # verl tests the *normalised* prediction, so an `Answer:` line that normalises to
        # "[INVALID]" (`Answer: [INVALID] cm`) falls back too; with no box, Minerva's verdict stays.
        if boxed_fallback and pred == INVALID:
            content = _final_box_content(tail)
            if content is not None:
                correct, pred = content == truth, content
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
