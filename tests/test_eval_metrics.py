"""Evaluation metrics against closed forms and a literal re-enactment of verl's bootstrap procedure."""
import math
from fractions import Fraction

import numpy as np
import pytest

from dapo_jax.eval import metrics as M


def _verl_style_bootstrap(values, preds, k, n_bootstrap=1000, seed=42):
    """Independent reference: verl's described loop, global numpy seed, dict-order majority vote."""
    out = {}
    np.random.seed(seed)
    best, worst = [], []
    for _ in range(n_bootstrap):
        idx = np.random.choice(len(values), size=k, replace=True)
        best.append(max(values[i] for i in idx))
        worst.append(min(values[i] for i in idx))
    np.random.seed(seed)
    maj = []
    for _ in range(n_bootstrap):
        idx = np.random.choice(len(values), size=k, replace=True)
        groups = {}
        for i in idx:
            groups.setdefault(preds[i], []).append(values[i])
        top = max(groups, key=lambda p: len(groups[p]))
        maj.append(groups[top][0])
    for name, xs in (("best", best), ("worst", worst), ("maj", maj)):
        out[f"{name}@{k}/mean"], out[f"{name}@{k}/std"] = np.mean(xs), np.std(xs)
    return out


def _random_problem(rng, n, n_preds):
    # Accuracy is a function of the prediction, as with a real scorer: pred "0" is correct.
    preds = [str(rng.integers(n_preds)) for _ in range(n)]
    return [(p == "0", p) for p in preds]


@pytest.mark.parametrize("seed", range(40))
def test_pass_at_k_equals_binomial_closed_form(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    c = int(rng.integers(0, n + 1))
    k = int(rng.integers(1, n + 1))
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert M.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-12)


def test_pass_at_k_limits():
    assert M.pass_at_k(32, 0, 8) == 0.0
    assert M.pass_at_k(32, 32, 1) == 1.0
    assert M.pass_at_k(32, 25, 8) == 1.0  # fewer than k wrong samples: some draw is right
    assert M.pass_at_k(32, 5, 1) == pytest.approx(5 / 32)
    with pytest.raises(ValueError, match="k=33"):
        M.pass_at_k(32, 5, 33)
    with pytest.raises(ValueError, match="c=40"):
        M.pass_at_k(32, 40, 1)


def test_avg_and_pass_on_hand_worked_problems():
    problems = [
        [(True, "1"), (False, "2"), (True, "1"), (True, "1")],  # c=3
        [(False, "5"), (False, "6"), (False, "5"), (True, "9")],  # c=1
    ]
    assert M.avg_at_k(problems, 1) == pytest.approx((1 + 0) / 2)
    assert M.avg_at_k(problems, 2) == pytest.approx((1 / 2 + 0) / 2)
    assert M.avg_at_k(problems, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)
    # pass@2: 1 - C(1,2)/C(4,2) = 1 and 1 - C(3,2)/C(4,2) = 1/2.
    assert M.mean_pass_at_k(problems, 2) == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="k=5"):
        M.avg_at_k(problems, 5)


def test_k_values_follow_powers_of_two_then_n():
    assert M.k_values(32) == [1, 2, 4, 8, 16, 32]
    assert M.k_values(30) == [1, 2, 4, 8, 16, 30]
    assert M.k_values(1) == [1]


@pytest.mark.parametrize("n, n_preds, seed", [(32, 3, 0), (32, 6, 1), (8, 2, 2), (5, 4, 3)])
def test_bootstrap_statistics_match_verl_procedure(n, n_preds, seed):
    samples = _random_problem(np.random.default_rng(seed), n, n_preds)
    values = [acc for acc, _ in samples]
    preds = [pred for _, pred in samples]
    ours = M.problem_bootstrap_metrics(samples)
    for k in [k for k in (2, 4, 8, 16) if k < n] + [n]:
        for name, expected in _verl_style_bootstrap(values, preds, k).items():
            assert ours[name] == pytest.approx(expected, abs=1e-12), name
    assert ours[f"mean@{n}"] == pytest.approx(np.mean(values))
    assert ours[f"std@{n}"] == pytest.approx(np.std(values))


def test_majority_vote_ties_go_to_first_seen():
    assert M.majority_vote(["b", "a", "a", "b", "c"]) == "b"
    assert M.majority_vote(["x", "y", "y"]) == "y"


def test_generic_bootstrap_metric_matches_reference_on_means():
    data = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    [(mean, std)] = M.bootstrap_metric(data, 3, [np.mean], n_bootstrap=50, seed=7)
    np.random.seed(7)
    draws = [np.mean([data[i] for i in np.random.choice(6, size=3, replace=True)]) for _ in range(50)]
    assert (mean, std) == pytest.approx((np.mean(draws), np.std(draws)))


def test_verl_names_and_sections_for_32_samples():
    rng = np.random.default_rng(5)
    problems = [_random_problem(rng, 32, 3) for _ in range(3)]
    metrics = M.evaluation_metrics(problems, "aime2024", n_bootstrap=20)
    core = {name for name in metrics if name.startswith("val-core/")}
    assert core == {
        f"val-core/aime2024/acc/{stat}"
        for stat in ["mean@32", "best@32/mean", "best@32/std", "maj@32/mean", "maj@32/std"]
    }
    aux = {
        name.removeprefix("val-aux/aime2024/acc/") for name in metrics if name.startswith("val-aux/")
    }
    expected_aux = {"std@32", "worst@32/mean", "worst@32/std"}
    for k in (2, 4, 8, 16):
        expected_aux |= {f"{s}@{k}/{m}" for s in ("best", "worst", "maj") for m in ("mean", "std")}
    expected_aux |= {f"{s}@{k}" for s in ("avg", "pass") for k in (1, 2, 4, 8, 16, 32)}
    assert aux == expected_aux
    mean_acc = np.mean([[acc for acc, _ in p] for p in problems])
    assert metrics["val-core/aime2024/acc/mean@32"] == pytest.approx(mean_acc)
    assert metrics["val-aux/aime2024/acc/avg@32"] == pytest.approx(mean_acc)


def test_uneven_sample_counts_average_each_metric_over_problems_that_have_it():
    a = [(True, "1"), (False, "2")]
    b = [(True, "1"), (True, "1"), (False, "3"), (False, "4")]
    got = M.bootstrap_accuracy_metrics([a, b], n_bootstrap=10)
    assert got["mean@2"] == pytest.approx(0.5)  # only problem a has exactly 2 samples
    assert got["mean@4"] == pytest.approx(0.5)
    assert "best@4/mean" in got and "best@2/mean" in got
    metrics = M.evaluation_metrics([a, b], "mix", n_bootstrap=10)
    assert "val-aux/mix/acc/pass@4" not in metrics  # k stops at the smallest problem's n
    # pass@2: a has 1 wrong of 2, so any 2 draws include the right one; b: 1 - C(2,2)/C(4,2).
    assert metrics["val-aux/mix/acc/pass@2"] == pytest.approx((1 + (1 - 1 / 6)) / 2)


def test_single_sample_problems_report_mean_only():
    metrics = M.evaluation_metrics([[(True, "1")], [(False, "2")]], "d")
    assert metrics == {
        "val-core/d/acc/mean@1": 0.5,
        "val-aux/d/acc/avg@1": 0.5,
        "val-aux/d/acc/pass@1": 0.5,
    }


def test_response_length_stats_against_numpy():
    lengths = [10, 200, 4096, 37, 4096]
    stats = M.response_length_stats(lengths, ["stop", "stop", "length", "stop", "length"])
    assert stats == pytest.approx(
        {"mean": np.mean(lengths), "max": 4096, "min": 10, "std": np.std(lengths), "clip_ratio": 0.4}
    )
    assert M.response_length_stats(lengths, max_length=4096)["clip_ratio"] == pytest.approx(0.4)
    assert "clip_ratio" not in M.response_length_stats(lengths)


def test_input_errors_are_explicit():
    with pytest.raises(ValueError, match="no problems"):
        M.evaluation_metrics([], "d")
    with pytest.raises(ValueError, match="problem #1 has no samples"):
        M.avg_at_k([[(True, "1")], []], 1)
    with pytest.raises(TypeError, match=r"\(acc: bool, pred: str\)"):
        M.avg_at_k([[(1, "1")]], 1)
    with pytest.raises(ValueError, match="dataset"):
        M.evaluation_metrics([[(True, "1")]], "a/b")
    with pytest.raises(ValueError, match="finish_reasons has 1"):
        M.response_length_stats([1, 2], ["stop"])
