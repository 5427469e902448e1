"""Batch scoring: same verdicts as one-by-one rules, input order kept, workers used for big batches."""
import os

import pytest

from dapo_jax.rewards import batch
from dapo_jax.rewards.batch import available_scorers, register_scorer, score_batch


def pid_probe(response: str, ground_truth: str) -> dict:
    """Test scorer: echoes the response's index and reports which process scored it."""
    return {"score": float(response), "acc": True, "pred": str(os.getpid())}


if "pid_probe" not in available_scorers():
    register_scorer("pid_probe", pid_probe, min_parallel=1_000_000)


def _alternating_batch(size: int) -> tuple[list[str], list[str], list[bool]]:
    # Response i answers i; the truth is i for even i and i + 1 for odd i, so acc == (i even).
    responses = [f"Step {i}.\nAnswer: {i}" for i in range(size)]
    truths = [str(i if i % 2 == 0 else i + 1) for i in range(size)]
    return responses, truths, [i % 2 == 0 for i in range(size)]


def test_inline_batch_matches_rule_in_order():
    responses, truths, expected = _alternating_batch(50)
    results = score_batch(responses, truths)
    assert [r["acc"] for r in results] == expected
    assert [r["score"] for r in results] == [1.0 if ok else -1.0 for ok in expected]
    assert [r["pred"] for r in results] == [str(i) for i in range(50)]


def test_small_batch_runs_in_this_process():
    results = score_batch(["0", "1", "2"], ["", "", ""], scorer="pid_probe", num_workers=2)
    assert {r["pred"] for r in results} == {str(os.getpid())}


def test_worker_pool_keeps_order_and_verdicts_with_jax_initialised():
    import jax.numpy as jnp

    jnp.ones(3).block_until_ready()  # JAX is live in the parent, so forking would be unsafe
    responses, truths, expected = _alternating_batch(40)
    results = score_batch(responses, truths, num_workers=2, min_parallel=1)
    assert [r["acc"] for r in results] == expected
    assert [r["pred"] for r in results] == [str(i) for i in range(40)]

    probes = score_batch([str(i) for i in range(16)], [""] * 16, scorer="pid_probe",
                         num_workers=2, min_parallel=1)
    assert [r["score"] for r in probes] == [float(i) for i in range(16)]
    assert str(os.getpid()) not in {r["pred"] for r in probes}


def test_megabyte_response_scores_like_its_tail():
    long_response = "{" * (1 << 20) + "\nAnswer: 42"
    [result] = score_batch([long_response], ["42"])
    assert result == {"score": 1.0, "acc": True, "pred": "42"}


def test_scorer_kwargs_reach_the_scorer():
    results = score_batch(["\\boxed{42}", "Answer: 42"], ["42", "42"],
                          scorer_kwargs={"strict_box_verify": True})
    assert [r["acc"] for r in results] == [True, False]


def test_registry_lists_both_math_scorers():
    assert {"math_dapo", "math_verify"} <= set(available_scorers())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="same length"):
        score_batch(["a"], ["1", "2"])
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*math_dapo"):
        score_batch(["a"], ["1"], scorer="nope")
    with pytest.raises(ValueError, match="num_workers"):
        score_batch(["a"], ["1"], num_workers=0)
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        score_batch(["a", None], ["1", "2"])
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("math_dapo", pid_probe)
    with pytest.raises(ValueError, match="module-level"):
        register_scorer("lambda_scorer", lambda r, t: {})
    assert "lambda_scorer" not in batch.available_scorers()
