"""Symbolic scorer: accepts mathematically equal answers, never loosens the DAPO default, times out."""
import signal
import threading
import time

import pytest

from dapo_jax.rewards import math_dapo, symbolic
from dapo_jax.rewards.batch import score_batch

# (response, ground truth, equal?) judged by hand as mathematics.
CASES = [
    ("Answer: 0.5", "\\frac{1}{2}", True),
    ("so the result is \\boxed{\\dfrac12}", "\\frac{1}{2}", True),  # no Answer line: last box
    ("Answer: \\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("Answer: 3.0", "3", True),
    ("Answer: 042", "42", True),
    ("Answer: 2\\sqrt{3}", "\\sqrt{12}", True),
    ("Answer: 1/3", "\\frac{1}{2}", False),
    ("Answer: 4.6667", "\\frac{14}{3}", False),
    ("I could not finish.", "42", False),
]


@pytest.mark.parametrize("response, truth, equal", CASES)
def test_symbolic_verdict(response, truth, equal):
    result = symbolic.compute_score(response, truth)
    assert result["acc"] is equal
    assert result["score"] == (1.0 if equal else -1.0)


def test_prediction_is_minerva_normalised_for_voting():
    assert symbolic.compute_score("Answer: 0.5 cm", "\\frac12")["pred"] == "0.5"
    assert symbolic.compute_score("nothing", "1")["pred"] == "[INVALID]"


def test_dapo_default_stays_strict_on_symbolic_only_matches():
    symbolic_only = [(r, t) for r, t, equal in CASES[:6] if equal]
    assert not any(math_dapo.compute_score(r, t)["acc"] for r, t in symbolic_only)
    assert not any(r["acc"] for r in score_batch(*map(list, zip(*symbolic_only))))
    chosen = score_batch(*map(list, zip(*symbolic_only)), scorer="math_verify")
    assert all(r["acc"] for r in chosen)


def _recording(check, log):
    """Wraps a stand-in for _parse_and_verify so the test sees how each call ended."""
    def wrapped(*args):
        try:
            result = check(*args)
        except BaseException as e:  # noqa: BLE001 - SampleTimeout is a BaseException on purpose
            log.append(type(e))
            raise
        log.append("returned")
        return result
    return wrapped


def test_per_sample_timeout_interrupts_a_stuck_check(monkeypatch):
    # Behaviour, not speed: the stuck check is cut short by the sample's deadline (it would
    # otherwise sleep its 30 s out and return), and the sample scores as wrong.
    ends = []
    monkeypatch.setattr(symbolic, "_parse_and_verify", _recording(lambda *a: time.sleep(30), ends))
    result = symbolic.compute_score("Answer: 0.5", "\\frac{1}{2}", timeout_s=0.2)
    assert ends == [symbolic.SampleTimeout]
    assert result == {"score": -1.0, "acc": False, "pred": "0.5"}


def test_timeout_restores_callers_alarm_and_handler(monkeypatch):
    monkeypatch.setattr(symbolic, "_parse_and_verify", lambda *args: time.sleep(30))

    def caller_handler(signum, frame):
        raise AssertionError("the caller's alarm fired during the test")

    previous = signal.signal(signal.SIGALRM, caller_handler)
    armed = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        symbolic.compute_score("Answer: 0.5", "\\frac{1}{2}", timeout_s=0.1)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        since_armed = time.monotonic() - armed
        # The caller's timer is re-armed with what it had left: 100 s minus the time that passed
        # (at least the 0.1 s budget that ran out), never reset to 100 s or cancelled. Both bounds
        # hold however slow the machine is.
        assert 100.0 - since_armed - 0.05 <= remaining <= 100.0 - 0.1
        assert signal.getsignal(signal.SIGALRM) is caller_handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_adversarial_megabyte_is_scored_wrong_from_its_tail(monkeypatch):
    # Only the final TAIL_CHARS are read, and they hold no `Answer:` line or complete box, so the
    # megabyte never reaches math-verify at all. (How long scoring takes is a benchmark question.)
    ends = []
    monkeypatch.setattr(symbolic, "_parse_and_verify",
                        _recording(symbolic._parse_and_verify, ends))
    result = symbolic.compute_score("Answer: " + "(\\frac{" * (1 << 18), "1", timeout_s=0.5)
    assert ends == []
    assert result == {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_off_main_thread_scores_with_a_warning():
    symbolic._thread_warning_shown = False
    outcome = {}

    def work():
        outcome["result"] = symbolic.compute_score("Answer: 0.5", "\\frac{1}{2}")

    with pytest.warns(RuntimeWarning, match="main thread"):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert outcome["result"]["acc"] is True


def test_rejects_non_positive_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        symbolic.compute_score("Answer: 1", "1", timeout_s=0)
