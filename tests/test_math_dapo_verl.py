"""Our math_dapo scorer equals verl's own file on thousands of random responses, in both modes.

The reference is verl 0.9.1's `verl/utils/reward_score/math_dapo.py`, installed without its
dependencies by `make install-test` (into .venv/nodeps, see requirements-test-nodeps.txt) and
loaded by file path: it needs only the standard library, while `import verl` would run
verl/__init__.py, which needs torch, ray and more. A missing or different verl FAILS the tests
(never a skip), so the comparison cannot silently stop running.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dapo_jax.rewards import math_dapo
from dapo_jax.rewards.batch import score_batch

VERL_VERSION = "0.9.1"
VERL_FILE = "verl/utils/reward_score/math_dapo.py"
# Where `make install-test` puts no-deps test references (pip --target): inside the venv, but off
# sys.path, because verl's wheel also ships top-level `scripts`/`tests` packages that would shadow
# ours. sys.prefix is the venv, also when the tests run from a scratch copy of the repository.
NODEPS_DIR = Path(sys.prefix) / "nodeps"
INSTALL_HINT = (
    f"run `make install-test`, which installs verl=={VERL_VERSION} without dependencies into "
    f"{NODEPS_DIR} (to redo just that: {sys.executable} -m pip install --no-deps --upgrade "
    f"--target {NODEPS_DIR} -r requirements-test-nodeps.txt)"
)

CORPUS_SIZE = 10000
CORPUS_SEED = 20260517


def _load_verl_math_dapo() -> ModuleType:
    """verl 0.9.1's math_dapo module, executed from its file alone (verl/__init__.py never runs)."""
    search_path = [str(NODEPS_DIR), *sys.path]
    dists = list(importlib.metadata.distributions(name="verl", path=search_path))
    if not dists:
        pytest.fail(f"verl, the reference scorer, is not installed: {INSTALL_HINT}", pytrace=False)
    dist = dists[0]
    if dist.version != VERL_VERSION:
        pytest.fail(f"found verl {dist.version} at {dist.locate_file('')}, the tests compare with "
                    f"verl {VERL_VERSION}: {INSTALL_HINT}", pytrace=False)
    [record] = [f for f in dist.files or () if str(f) == VERL_FILE] or [None]
    path = Path(dist.locate_file(VERL_FILE))
    if record is None or not path.is_file():
        pytest.fail(f"verl {VERL_VERSION} has no {VERL_FILE} at {path}: {INSTALL_HINT}",
                    pytrace=False)
    # The wheel's RECORD hash proves the file is verl's, not a locally edited copy.
    if record.hash is None:
        pytest.fail(f"verl {VERL_VERSION}'s RECORD has no hash for {VERL_FILE}: {INSTALL_HINT}",
                    pytrace=False)
    digest = hashlib.new(record.hash.mode, path.read_bytes()).digest()
    if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != record.hash.value:
        pytest.fail(f"{path} differs from the file verl {VERL_VERSION} shipped: {INSTALL_HINT}",
                    pytrace=False)
    spec = importlib.util.spec_from_file_location("_verl_0_9_1_math_dapo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def verl() -> ModuleType:
    return _load_verl_math_dapo()


# ----------------------------------------------------------------------------- the random corpus
# Answer values as models write them: every kind of thing Minerva's normalisation rewrites (units,
# \text, \frac shorthand, $...$, commas, degrees, dollars, `=`), things it leaves alone (\dfrac,
# 042, 3.0), unicode digits and symbols, nested boxes, empty and whitespace-only answers, and the
# "[INVALID]" sentinel itself.
_FIXED_VALUES = [
    "42", "-7", "0", "042", "3.0", "0.5", ".5", "42.", "1,000", "12,345", "1,2", "1000000",
    "\\frac{1}{2}", "\\frac12", "\\frac1{2}", "\\fracab", "\\dfrac{1}{2}", "\\tfrac{3}{4}",
    "\\frac{\\sqrt{3}}{2}", "\\sqrt{2}", "\\sqrt2", "\\sqrt{2}}", "3\\sqrt{2}", "2\\sqrt3",
    "\\pi", "2\\pi", "\\infty", "x^2+1", "(1,2)", "(1, 2)", "[0, \\infty)", "\\{1, 2\\}",
    "\\left( 1, 2 \\right)", "\\text{(A)}", "(A)", "\\textbf{B}", "\\mbox{odd}", "\\text{odd}",
    "\\overline{AB}", "\\text{Evelyn}", "5\\text{ cm}", "10 cm", "5 meters", "5 kilometers",
    "90^\\circ", "90^{\\circ}", "90°", "45 degrees", "\\$5", "5 dollars", "\\$1,000", "$42$",
    "$x=3$", "x = 3", "y=2x+1", "a = b = 9", "1, 2, \\ldots", "1, 2, \\dots", "3\\text{ and }4",
    "3,\\text{ and }4", "\\boxed{7}", "$\\boxed{7}$", "\\boxed{\\frac{1}{\\sqrt{2}}}",
    "\\boxed{{5}}", "\\boxed{5", "50\\%", "2^{10}", "1\\;000", "10{,}000", "1,\\!000", '"yes"',
    "6 \\text{s}", "an integer 42", "a 5", "5 units", "12 ways", "6 students", "7\\mathrm{th}",
    "4 square feet", "3 hours", "20 mph", "\\text{m}", "5\\ \\text{cm}", "\\$ 3.50", "π", "√2",
    "½", "x²", "²", "٣", "１２", "1,２", "数", "é", "[INVALID]", "\\text{[INVALID]}",
    "[INVALID] cm", "", " ", "  \t", "x", "Answer: 42", "\\boxed{}", "{", "}", "$", "$$",
    "\\", "\\\\", "=", "5=", "\\text{5 inches}", "\\overline{3}", "\\textbf{\\text{7}}",
]
# Words and TeX from Minerva's removal list (and near misses), appended to answers and truths.
_UNITS = ["", " cm", " meters", " degrees", "^\\circ", " dollars", "\\text{ ways}", " units",
          " integers", "\\%", " km", " cents", " points", " minutes", " digits", " gm", " pounds",
          " meals", " edges", " children tickets", " multiples", " sue", " square feet", " hours",
          " mph", " inches", " students", "\\text{.}", "\\text{\ns}", "\\text{m}^2", "\\text{m}^3",
          "\\text{\n}", "\\text{ s}", " kilometers", " minute", "\\mathrm{th}", "\\;", "\\dots"]
_FILLER_WORDS = [
    "so", "the", "answer", "we", "get", "=", "x", "+", "2", "\\frac{1}{2}", "$x$", "{", "}",
    "\\boxed{3}", "\n", "\n\n", "\r\n", "résumé", "数学", "∑", "😀", "\\text{hi}", "$", ",",
    ".",
    "Thus", "compute", "\\sqrt{5}", "Answer", "boxed", "step", "  ", "\t", "therefore",
]
_LABELS = [
    "Answer:", "Answer: ", "answer:", "ANSWER:", "AnSwEr :", "Answer :", "Answer:\n",
    "Answer:  \n\n ", "Final Answer:", "Final answer: ", "**Answer:** ", "**Answer: ",
    "The answer: ", "Answer：", "Answer -", "answer is ", "Answer:\t", "Answer\u00a0: ",
    "Answer\n:", "Answers: ", "#### Answer: ",
]
_LINE_ENDS = ["", "\n", ".", " ", "\r\n", "\n\nThat is all.", "$", "**", "\n" + "x" * 20]


def _number(rng: random.Random) -> str:
    value = rng.choice([rng.randrange(10), rng.randrange(1000), rng.randrange(10**7)])
    text = str(value)
    kind = rng.randrange(6)
    if kind == 0:
        text = f"{value:,}"
    elif kind == 1:
        text = "-" + text
    elif kind == 2:
        text = f"{text}.{rng.randrange(100)}"
    return text


def _value(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return _number(rng)
    if kind == 1:
        return _number(rng) + rng.choice(_UNITS)
    if kind == 2:
        a, b = rng.randrange(1, 20), rng.randrange(1, 20)
        return rng.choice([f"\\frac{{{a}}}{{{b}}}", f"\\frac{a}{b}", f"\\dfrac{{{a}}}{{{b}}}",
                           f"{a}\\sqrt{{{b}}}", f"\\sqrt{a}", f"({a}, {b})", f"{a}/{b}"])
    return rng.choice(_FIXED_VALUES)


def _variant(rng: random.Random, value: str) -> str:
    """The same answer written another way (sometimes equal after normalisation, sometimes not)."""
    return rng.choice([
        value, value, f" {value} ", f"${value}$", f"\\boxed{{{value}}}", f"x={value}",
        f"x = {value}", f"\\text{{{value}}}", value + rng.choice(_UNITS), value.replace(",", ""),
        value.replace(" ", ""), value.replace("\\frac", "\\dfrac"), value.upper(), f"{value}.",
    ])


def _filler(rng: random.Random, max_chars: int) -> str:
    target = rng.randrange(max_chars + 1)
    parts, length = [], 0
    while length < target:
        word = rng.choice(_FILLER_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:target]


def _box(rng: random.Random, value: str) -> str:
    return rng.choice([
        f"\\boxed{{{value}}}", f"$\\boxed{{{value}}}$", f"\\boxed{{{value}",
        f"\\boxed{{{{{value}}}}}",
        f"\\boxed{{\\text{{{value}}}}}", f"\\boxed {{{value}}}", f"\\fbox{{{value}}}",
        f"\\boxed{{{value}}}\\boxed{{{_value(rng)}}}", f"\\boxed{{\n{value}\n}}",
    ])


def _response(rng: random.Random, answer: str, truth: str) -> str:
    """One response; the structure is drawn so every path of both rules is taken often."""
    kind = rng.randrange(10)
    head = _filler(rng, 400)
    label, end = rng.choice(_LABELS), rng.choice(_LINE_ENDS)
    if kind == 0:  # no answer at all (maybe braces and box lookalikes in the filler)
        return rng.choice(["", head, head + rng.choice(["{", "}", "\\boxed", "\\boxed{"])])
    if kind == 1:  # a box only, at a random distance from the end (the window is 100 chars)
        boxed = _box(rng, truth if rng.random() < 0.5 else answer)
        return head + f" so the answer is {boxed}." + _filler(rng, 130)
    if kind == 2:  # an Answer line and a box
        box = _box(rng, rng.choice([answer, _value(rng)]))
        parts = [f"{label}{answer}{end}", box]
        rng.shuffle(parts)
        return head + "\n" + "\n".join(parts) + _filler(rng, 40)
    if kind == 3:  # several Answer lines, or two on one line
        first = f"{rng.choice(_LABELS)}{_value(rng)}"
        joiner = rng.choice(["\n", " ", "\n\n", ""])
        return head + first + joiner + f"{label}{answer}{end}" + _filler(rng, 30)
    if kind == 4:  # the answer far from the end: past the 300-character tail or just inside it
        return head + f"\n{label}{answer}{end}" + "x" * rng.randrange(250, 320)
    if kind == 5:  # an Answer line that normalises to "[INVALID]", then maybe a box
        junk = rng.choice(["[INVALID]", "x = [INVALID]", "$[INVALID]$", "[INVALID] cm", ""])
        box = _box(rng, rng.choice([truth, answer])) if rng.random() < 0.7 else ""
        return head + f"\n{label}{junk}\n{box}"
    return head + f"\n{label}{answer}{end}"  # the common case: one Answer line at the end


def build_corpus(size: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[tuple[str, str]]:
    """(response, ground truth) pairs; truths are written in several forms of the answer."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(size):
        truth = _value(rng)
        answer = _variant(rng, truth) if rng.random() < 0.75 else _value(rng)
        if rng.random() < 0.3:
            truth = _variant(rng, truth)
        corpus.append((_response(rng, answer, truth), truth))
    return corpus


def _dapo_release_score(verl: ModuleType, response: str, truth: str) -> dict:
    """The DAPO release's compute_score, rebuilt from verl 0.9.1's parts.

    The DAPO release's `verify` (non-strict) was just `is_correct_minerva(solution_str, answer)`
    on the last 300 characters, with no `\\boxed{}` fallback. verl 0.9.1 kept
    `is_correct_minerva`, `normalize_final_answer` and the 300-character cut unchanged and added
    the fallback only inside `verify`, so this composition of its unchanged parts is the release's
    scorer, which is our default.
    """
    correct, pred = verl.is_correct_minerva(response[-300:], truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return build_corpus()


@pytest.fixture(scope="module")
def verl_fallback(verl, corpus) -> list[dict]:
    """verl 0.9.1's compute_score (the Answer: line, else the last box) on the corpus."""
    return [verl.compute_score(response, truth) for response, truth in corpus]


@pytest.fixture(scope="module")
def verl_release(verl, corpus) -> list[dict]:
    """The DAPO release's rule (no box fallback), from verl 0.9.1's parts, on the corpus."""
    return [_dapo_release_score(verl, response, truth) for response, truth in corpus]


def _assert_same(ours: list[dict], reference: list[dict], corpus) -> None:
    bad = [f"response={response!r}\n  truth={truth!r}\n  ours={mine}\n  verl={theirs}"
           for (response, truth), mine, theirs in zip(corpus, ours, reference) if mine != theirs]
    assert not bad, (f"{len(bad)} of {len(corpus)} differ from verl {VERL_VERSION}; first ones:\n"
                     + "\n".join(bad[:5]))


# ----------------------------------------------------------------------------------- the tests
def test_boxed_fallback_equals_verl_0_9_1_compute_score(verl_fallback, corpus):
    ours = [math_dapo.compute_score(response, truth, boxed_fallback=True)
            for response, truth in corpus]
    _assert_same(ours, verl_fallback, corpus)
    # The same through score_batch, the path training and evaluation take.
    _assert_same(score_batch(*zip(*corpus), boxed_fallback=True), verl_fallback, corpus)


def test_default_equals_dapo_release_rule_from_verl_parts(verl_release, corpus):
    ours = [math_dapo.compute_score(response, truth) for response, truth in corpus]
    _assert_same(ours, verl_release, corpus)
    _assert_same(score_batch(*zip(*corpus)), verl_release, corpus)


def test_strict_box_verify_equals_verl_up_to_missing_box_pred(verl, corpus):
    # verl reports a missing box as pred None; ours reports "[INVALID]" so that `pred` is always a
    # str (reports, majority votes). Score and acc must agree exactly.
    reference = []
    for response, truth in corpus:
        result = verl.compute_score(response, truth, strict_box_verify=True)
        if result["pred"] is None:
            result = {**result, "pred": math_dapo.INVALID}
        reference.append(result)
    ours = [math_dapo.compute_score(response, truth, strict_box_verify=True)
            for response, truth in corpus]
    _assert_same(ours, reference, corpus)


def test_corpus_exercises_every_path_of_both_rules(verl_fallback, verl_release, corpus):
    """Guards the comparison's power: a generator change must not leave paths untested."""
    decided_by_box = [f for f, d in zip(verl_fallback, verl_release) if f["pred"] != d["pred"]]
    counts = {
        "correct (release rule)": sum(d["acc"] for d in verl_release),
        "wrong with an answer (release rule)": sum(
            not d["acc"] and d["pred"] != math_dapo.INVALID for d in verl_release),
        "no answer and no box": sum(f["pred"] == math_dapo.INVALID for f in verl_fallback),
        "decided by the box, correct": sum(f["acc"] for f in decided_by_box),
        "decided by the box, wrong": sum(not f["acc"] for f in decided_by_box),
        "verdict changed by the fallback": sum(
            f["acc"] != d["acc"] for f, d in zip(verl_fallback, verl_release)),
        "Answer line cut off by the 300-char tail": sum(
            1 for r, _ in corpus if "answer" in r.lower() and "answer" not in r[-300:].lower()),
        "[INVALID] written in the tail": sum(1 for r, _ in corpus if "[INVALID]" in r[-300:]),
        "empty response": sum(1 for r, _ in corpus if not r),
        "non-ASCII response": sum(1 for r, _ in corpus if not r.isascii()),
    }
    thin = {name: n for name, n in counts.items() if n < 40}
    assert not thin, f"the corpus barely covers {thin} (all counts: {counts})"
    assert len({d["pred"] for d in verl_release}) >= 500  # many distinct normalised answers
