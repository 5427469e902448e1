"""DAPO's math reward: hand-derived tables of the reference rule's verdicts, plus bounded work.

verl's own file is the reference in tests/test_math_dapo_verl.py; these tables pin the behaviours
one by one, so a failure here names the rule that broke.
"""

import pytest

from configs.base import get_base_config
from dapo_jax.config_validation import ConfigError, validate_config
from dapo_jax.rewards import math_dapo
from dapo_jax.rewards.batch import score_batch
from dapo_jax.rewards.math_dapo import TAIL_CHARS, compute_score, normalize_final_answer

FILLER = "x" * 300

# (response, ground truth, expected acc, expected normalised prediction). Each expectation is
# derived by walking the published rule by hand: last 300 chars, last `Answer\s*:\s*([^\n]+)`,
# Minerva normalisation of both sides, exact string equality.
CASES = [
    # Plain answers and the Answer-line grammar.
    ("Reasoning...\nAnswer: 42", "42", True, "42"),
    ("answer:42", "42", True, "42"),
    ("ANSWER : 42", "42", True, "42"),
    ("Answer:\n42", "42", True, "42"),  # \s* after the colon crosses the newline
    ("Answer:   \n\n   42", "42", True, "42"),
    ("Final answer: 42", "42", True, "42"),  # "answer" inside other words still counts
    ("Answer: 42   ", "42", True, "42"),
    ("Answer: 42\r\n", "42", True, "42"),  # the \r survives extraction, strip() removes it
    ("Answer: -7", "-7", True, "-7"),
    ("Answer: -7", "7", False, "-7"),
    ("Answer: 204", 204, True, "204"),  # integer ground truths compare as their decimal string
    ("Answer: 42", " 42 ", True, "42"),
    # Several Answer lines: the last one wins, and a second "Answer:" on one line is swallowed.
    ("Answer: 7\nAnswer: 42", "42", True, "42"),
    ("Answer: 42\nAnswer: 7", "42", False, "7"),
    ("Answer: 42\nThe answer: 43", "42", False, "43"),
    ("Answer: Answer: 42", "42", False, "Answer:42"),
    ("Answer: The answer is 42", "42", False, "Theansweris42"),
    # Only the last 300 characters are read.
    ("Answer: 42\n" + FILLER, "42", False, "[INVALID]"),
    ("Answer: 7\n" + FILLER + "\nAnswer: 42", "42", True, "42"),
    ("Answer: 42\n" + "x" * 289, "42", True, "42"),  # exactly 300 characters: still whole
    ("Answer: 42\n" + "x" * 293, "42", False, "[INVALID]"),  # 304: the tail starts at "wer:"
    ("step " * 200 + "\nAnswer: 42", "42", True, "42"),
    # No answer at all.
    ("", "42", False, "[INVALID]"),
    ("No final line here.", "42", False, "[INVALID]"),
    ("Answer:", "42", False, "[INVALID]"),
    ("The result is \\boxed{42}", "42", False, "[INVALID]"),  # a box alone is not an answer
    # Markdown emphasis around the label breaks the match.
    ("**Answer:** 42", "42", False, "**42"),
    ("**Answer: 42**", "42", False, "42**"),
    # Boxes and dollar signs.
    ("Answer: \\boxed{42}", "42", True, "42"),
    ("Answer: $\\boxed{42}$", "42", True, "42"),
    ("Answer: $42$", "42", True, "42"),
    ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\boxed{42}.", "42", False, "42."),
    ("Answer: \\boxed{42", "42", False, "\\boxed{42"),
    ("Answer: 42\n\\boxed{43}", "42", True, "42"),
    ("Answer: \\boxed{5}\nThat is all.", "5", True, "5"),
    ("Answer: $x$ and $y$", "x", True, "x"),  # only the first $...$ span survives
    ("Answer: 42", "\\boxed{42}", True, "42"),
    ("Answer: \\$5", "5", True, "5"),
    # Thousands separators and number formats.
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1000", "1,000", True, "1000"),
    ("Answer: 12,345,678", "12345678", True, "12345678"),
    ("Answer: 1,2", "12", True, "12"),  # commas go whenever the rest is all digits
    ("Answer: (1,2)", "(1, 2)", True, "(1,2)"),
    ("Answer: 042", "42", False, "042"),
    ("Answer: 3.0", "3", False, "3.0"),
    ("Answer: 1.000", "1000", False, "1.000"),
    ("Answer: 2^{10}", "1024", False, "2^{10}"),
    ("Answer: 1/2", "\\frac{1}{2}", False, "1/2"),
    ("Answer: 42.", "42", False, "42."),  # a trailing period is kept...
    ("Answer: $42.$", "42", True, "42"),  # ...unless it sits just before a closing $
    ("Answer: 50\\%", "50", False, "50\\%"),
    # Equations keep the right-hand side.
    ("Answer: x = 42", "42", True, "42"),
    ("Answer: 42", "x=42", True, "42"),
    ("Answer: a = b = 9", "9", True, "9"),
    # Units and words from Minerva's removal list.
    ("Answer: 10 cm", "10", True, "10"),
    ("Answer: 5 meters", "5", True, "5"),
    ("Answer: 5 dollars", "5", True, "5"),
    ("Answer: 7 units", "7", True, "7"),
    ("Answer: 100 degrees", "100", True, "100"),
    ("Answer: 90^\\circ", "90", True, "90"),
    ("Answer: 10^{\\circ}", "10", True, "10"),
    ("Answer: 42 integers", "42", True, "42"),
    ("Answer: an integer 42", "42", False, "integer42"),  # "an " goes, "integer" (no s) stays
    ("Answer: 5 kilometers", "5", False, "5kilo"),  # "meters" is stripped, "kilo" is not
    # \text, \textbf, \overline and friends.
    ("Answer: \\text{5 inches}", "5", True, "5"),
    ("Answer: 12 \\text{ ways}", "12", True, "12"),
    ("Answer: 5\\text{ cm}", "5", True, "5"),
    ("Answer: 6 \\text{s}", "6", True, "6"),
    ("Answer: \\textbf{42}", "42", True, "42"),
    ("Answer: \\overline{42}", "42", True, "42"),
    ("Answer: \\mbox{Evelyn}", "\\text{Evelyn}", True, "Evelyn"),
    ("Answer: 3\\text{ and }4", "3,4", True, "34"),
    # Fractions and roots: shorthand is expanded, \dfrac is not renamed.
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", False, "\\dfrac{1}{2}"),
    ("Answer: \\dfrac{1}{2}", "\\dfrac{1}{2}", True, "\\dfrac{1}{2}"),
    ("Answer: \\sqrt2", "\\sqrt{2}", True, "\\sqrt{2}"),
    ("Answer: 3\\sqrt{2}", "3\\sqrt2", True, "3\\sqrt{2}"),
]


@pytest.mark.parametrize("response, truth, acc, pred", CASES)
def test_reference_rule_verdict(response, truth, acc, pred):
    result = compute_score(response, truth)
    assert result == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


def test_table_is_large_and_covers_both_verdicts():
    assert len(CASES) >= 60
    assert sum(acc for _, _, acc, _ in CASES) >= 25
    assert sum(not acc for _, _, acc, _ in CASES) >= 25


# strict_box_verify: last \boxed{} of the final 100 characters, compared raw (no normalisation).
STRICT_CASES = [
    ("so the answer is \\boxed{42}", "42", True, "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("\\boxed{7} then \\boxed{42}", "42", True, "42"),
    ("\\boxed{ 42}", "42", False, " 42"),
    ("\\boxed{1,000}", "1000", False, "1,000"),
    ("Answer: 42", "42", False, "[INVALID]"),
    ("\\boxed{42}" + "x" * 150, "42", False, "[INVALID]"),
    ("\\boxed{42", "42", False, "[INVALID]"),
    ("\\boxed{204}", 204, True, "204"),
]


@pytest.mark.parametrize("response, truth, acc, pred", STRICT_CASES)
def test_strict_box_verdict(response, truth, acc, pred):
    result = compute_score(response, truth, strict_box_verify=True)
    assert result == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


# boxed_fallback (verl >= 0.9.1): the same inputs under both rules. Columns: response, truth,
# (acc, pred) of the DAPO release's rule (the default), (acc, pred) with boxed_fallback=True.
# Derived by hand: the fallback applies only when the normalised Answer prediction is "[INVALID]",
# reads the last complete \boxed{} of the final 100 of the 300 tail characters, and compares its
# raw content with the raw ground truth.
FALLBACK_CASES = [
    ("The result is \\boxed{42}", "42", (False, "[INVALID]"), (True, "42")),
    ("so $\\boxed{7}$.", "7", (False, "[INVALID]"), (True, "7")),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", (False, "[INVALID]"), (True, "\\frac{1}{2}")),
    ("\\boxed{7} then \\boxed{42}", "42", (False, "[INVALID]"), (True, "42")),
    ("\\boxed{204}", 204, (False, "[INVALID]"), (True, "204")),  # int truths as their string
    # Raw comparison: no normalisation of either side.
    ("\\boxed{ 42}", "42", (False, "[INVALID]"), (False, " 42")),
    ("\\boxed{1,000}", "1000", (False, "[INVALID]"), (False, "1,000")),
    ("\\boxed{\\text{42}}", "42", (False, "[INVALID]"), (False, "\\text{42}")),
    ("\\boxed{42}", "\\boxed{42}", (False, "[INVALID]"), (False, "42")),
    ("\\boxed{}", "", (False, "[INVALID]"), (True, "")),  # an empty box matches an empty truth
    # No usable box: the Minerva verdict stays.
    ("\\boxed{42}" + "x" * 100, "42", (False, "[INVALID]"), (False, "[INVALID]")),
    ("\\boxed{42" + "x" * 10, "42", (False, "[INVALID]"), (False, "[INVALID]")),
    ("\\fbox{42}", "42", (False, "[INVALID]"), (False, "[INVALID]")),
    ("", "42", (False, "[INVALID]"), (False, "[INVALID]")),
    # A usable Answer line always wins, even over a box that would be right.
    ("Answer: 7\n\\boxed{42}", "42", (False, "7"), (False, "7")),
    ("Answer: 42\n\\boxed{7}", "42", (True, "42"), (True, "42")),
    ("Answer:\n\\boxed{42}", "42", (True, "42"), (True, "42")),  # \s* crosses the newline
    ("**Answer:** \\boxed{42}", "42", (False, "**42"), (False, "**42")),
    # An Answer line that normalises to "[INVALID]" counts as none; one cut off by the tail too.
    ("Answer: [INVALID]\n\\boxed{42}", "42", (False, "[INVALID]"), (True, "42")),
    ("Answer: x = [INVALID] cm\n\\boxed{42}", "42", (False, "[INVALID]"), (True, "42")),
    ("Answer: 42\n" + "y" * 300 + "\\boxed{42}", "42", (False, "[INVALID]"), (True, "42")),
]


@pytest.mark.parametrize("response, truth, default, fallback", FALLBACK_CASES)
def test_boxed_fallback_verdicts_beside_the_release_rule(response, truth, default, fallback):
    for flag, (acc, pred) in ((False, default), (True, fallback)):
        expected = {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}
        assert compute_score(response, truth, boxed_fallback=flag) == expected, flag
    assert compute_score(response, truth) == compute_score(response, truth, boxed_fallback=False)


def test_fallback_table_covers_changed_and_unchanged_verdicts():
    changed = [case for case in FALLBACK_CASES if case[2] != case[3]]
    assert len(changed) >= 10 and len(FALLBACK_CASES) - len(changed) >= 8


def _fallback_batch():
    responses = [case[0] for case in FALLBACK_CASES]
    truths = [case[1] for case in FALLBACK_CASES]
    expected = {flag: [case[3 if flag else 2][0] for case in FALLBACK_CASES]
                for flag in (False, True)}
    return responses, truths, expected


def test_config_option_reaches_score_batch_through_the_trainer():
    from dapo_jax.training.trainer import configured_reward

    responses, truths, expected = _fallback_batch()
    config = get_base_config()
    config.model.preset = "tiny"
    assert config.reward.boxed_fallback is False  # the paper's scorer by default
    for flag in (False, True):
        config.reward.boxed_fallback = flag
        validate_config(config)
        results = configured_reward(config)(responses, truths)
        assert [r["acc"] for r in results] == expected[flag], flag


def test_boxed_fallback_in_worker_processes_matches_inline():
    responses, truths, expected = _fallback_batch()
    # min_parallel=1 forces the spawned pool: the flag must travel to the workers with the chunks.
    pooled = score_batch(responses, truths, boxed_fallback=True, num_workers=2, min_parallel=1)
    assert [r["acc"] for r in pooled] == expected[True]
    assert pooled == score_batch(responses, truths, boxed_fallback=True)


def test_boxed_fallback_option_errors_are_clear():
    config = get_base_config()
    config.reward.boxed_fallback = None
    with pytest.raises(ConfigError, match="reward.boxed_fallback: must be True or False"):
        validate_config(config)
    # math_verify always reads the box, so asking for the fallback there is accepted and a no-op.
    assert score_batch(["\\boxed{42}"], ["42"], scorer="math_verify", boxed_fallback=True)[0]["acc"]


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("\\text{(A)}", "(A)"),
        ("$\\boxed{\\frac{3}{4}}$ cm", "\\frac{3}{4}"),
        ("y = 2x + 1", "2x+1"),
        ("1,234", "1234"),
        ("\\ 5\\;", "5"),
        ('"yes"', "yes"),
        ("1, 2, \\ldots", "12"),  # "1,2," is all digits once commas go
    ],
)
def test_normalize_final_answer_examples(raw, normalised):
    assert normalize_final_answer(raw) == normalised


ONE_MB = 1 << 20


class _TailOnlyResponse(str):
    """A response that lets the scorer slice out its last TAIL_CHARS characters, and nothing else.

    Any other read of the whole string (a method such as .find, iteration, `in`, other slices)
    fails the test, so the scorer provably never scans the full megabyte.
    """

    _SCANS = frozenset(name for name in dir(str) if not name.startswith("_"))

    def __getattribute__(self, name):
        if name in _TailOnlyResponse._SCANS:
            raise AssertionError(f"the scorer called .{name}() on the whole response")
        return str.__getattribute__(self, name)

    def __getitem__(self, key):
        tail_start = len(self) - TAIL_CHARS
        start = key.start if isinstance(key, slice) else None
        if start is not None and start < 0:
            start += len(self)
        if not (isinstance(key, slice) and key.stop is None and key.step is None
                and start is not None and start >= tail_start):
            raise AssertionError(f"the scorer read [{key!r}] of a {len(self)}-char response")
        return str.__getitem__(self, key)

    def __iter__(self):
        raise AssertionError("the scorer iterated over the whole response")

    def __contains__(self, item):
        raise AssertionError("the scorer searched the whole response")


@pytest.mark.parametrize(
    "mode", [{}, {"strict_box_verify": True}, {"boxed_fallback": True}],
    ids=["default", "strict", "fallback"],
)
@pytest.mark.parametrize(
    "response",
    [
        "{" * ONE_MB + "Answer: 42",
        "\\boxed{" * (ONE_MB // 7) + "42",
        "9" * ONE_MB,
        "Answer: " * (ONE_MB // 8),
        "Answer: 42\n" * (ONE_MB // 11),
        "$" * ONE_MB,
        "Answer: " + "$\\text{" * (ONE_MB // 7),
        "Answer: " + "a" * ONE_MB,
    ],
    ids=["deep-braces", "nested-boxes", "digit-run", "answer-run", "answer-lines", "dollars",
         "text-run", "long-line"],
)
def test_adversarial_megabyte_work_is_bounded_by_the_tail(response, mode, monkeypatch):
    # Bounding what is read bounds the time without measuring it: the rule's regexes and loops
    # are polynomial in the text they get, and they never get more than TAIL_CHARS characters.
    lengths = []

    def recording(fn):
        def wrapper(text, *args, **kwargs):
            lengths.append(len(text))
            return fn(text, *args, **kwargs)
        return wrapper

    for name in ("extract_answer", "normalize_final_answer", "last_boxed"):
        monkeypatch.setattr(math_dapo, name, recording(getattr(math_dapo, name)))
    result = compute_score(_TailOnlyResponse(response), "42", **mode)
    assert lengths and max(lengths) <= TAIL_CHARS
    assert result == compute_score(response[-TAIL_CHARS:], "42", **mode)
    assert result["score"] in (1.0, -1.0)


def test_rejects_non_string_inputs_with_field_name():
    with pytest.raises(TypeError, match="solution_str"):
        compute_score(None, "42")
    with pytest.raises(TypeError, match="ground_truth"):
        compute_score("Answer: 42", 4.2)
