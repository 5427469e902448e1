"""Dynamic sampling (Eq. 11): the group filter and the accumulator (kept set, carry-over, cap, state)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.algo import (
    DynamicSamplingAccumulator,
    DynamicSamplingCapError,
    FilterMetric,
    keep_groups,
    select_filter_metric,
)

G = 4
PATTERNS = {
    "mixed": [1, 0, 1, 0],
    "mixed2": [0, 0, 0, 1],
    "correct": [1, 1, 1, 1],
    "wrong": [0, 0, 0, 0],
}


def gen_batch(first_prompt_id, kinds):
    """A generation batch of len(kinds) groups with each group's G samples contiguous.

    prompt_id identifies the group; tokens are [P*G, 3]; text is an object array; uid a str array."""
    p = len(kinds)
    pid = np.repeat(np.arange(first_prompt_id, first_prompt_id + p), G)
    acc = np.array([PATTERNS[k] for k in kinds], np.float32)
    batch = {
        "prompt_id": pid,
        "sample": np.tile(np.arange(G), p),
        "tokens": np.stack([pid * 10 + j for j in range(3)], axis=1),
        "text": np.array([f"p{i}-{k}" for i, k in zip(pid, np.repeat(kinds, G))], dtype=object),
        "uid": np.array([f"u{i}" for i in pid]),
    }
    return batch, acc


def group_ids(batch):
    pid = batch["prompt_id"].reshape(-1, G)
    assert np.all(pid == pid[:, :1]), "groups must stay contiguous and whole"
    np.testing.assert_array_equal(batch["sample"].reshape(-1, G), np.tile(np.arange(G), (len(pid), 1)))
    return list(pid[:, 0])


# ----------------------------------------------------------------------------- the pure filter


def test_keep_groups_keeps_exactly_the_groups_with_varying_outcomes():
    _, acc = gen_batch(0, ["mixed", "correct", "wrong", "mixed2"])
    np.testing.assert_array_equal(keep_groups(acc), [True, False, False, True])
    # shaped scores: an all-correct group with different overlong penalties varies
    score = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.75, 1.0, 1.0]])
    np.testing.assert_array_equal(keep_groups(score), [False, True])
    np.testing.assert_array_equal(jax.jit(keep_groups)(jnp.asarray(acc)), [True, False, False, True])


def test_singleton_groups_are_kept_like_verl():
    assert bool(np.all(keep_groups(np.array([[1.0], [0.0]]))))
    assert not np.any(keep_groups(np.array([[1.0], [0.0]]), keep_singletons=False))


def test_select_filter_metric_uses_verl_names():
    acc, score = np.zeros((1, 2)), np.ones((1, 2))
    assert select_filter_metric("acc", acc=acc, score=score) is acc
    assert select_filter_metric(FilterMetric.SCORE, acc=acc, score=score) is score
    with pytest.raises(ValueError, match="acc"):
        select_filter_metric("seq_reward", acc=acc, score=score)


# ----------------------------------------------------------------------------- kept set and carry-over


def test_kept_set_order_and_carry_over_across_steps():
    ds = DynamicSamplingAccumulator(train_batch_size=3, group_size=G, carry_over=True)
    assert ds.add(*gen_batch(0, ["mixed", "correct", "mixed2", "wrong"])) == 2
    assert not ds.ready() and not ds.should_stop_sampling()
    assert ds.add(*gen_batch(10, ["wrong", "mixed", "mixed2"])) == 2
    assert ds.ready() and ds.should_stop_sampling()

    batch, m = ds.emit()
    assert group_ids(batch) == [0, 2, 11]
    assert all(v.shape[0] == 3 * G for v in batch.values())
    assert batch["text"].dtype == object and batch["text"][0] == "p0-mixed"
    assert batch["uid"][-1] == "u11" and batch["tokens"].shape == (3 * G, 3)
    assert m["train/num_gen_batches"] == 2
    assert m["dynamic_sampling/generated_groups"] == 7
    assert m["dynamic_sampling/kept_groups"] == 4 and m["dynamic_sampling/dropped_groups"] == 3
    assert m["dynamic_sampling/frac_all_correct"] == pytest.approx(1 / 7)
    assert m["dynamic_sampling/frac_all_wrong"] == pytest.approx(2 / 7)
    assert m["dynamic_sampling/carried_in_groups"] == 0
    assert m["dynamic_sampling/carried_over_groups"] == 1 and m["dynamic_sampling/discarded_groups"] == 0
    assert m["dynamic_sampling/emitted_groups"] == 3 and m["dynamic_sampling/cap_reached"] == 0

    # next step starts from the carried-over group 12
    assert ds.num_kept_groups == 1 and ds.num_gen_batches == 0
    ds.add(*gen_batch(20, ["mixed", "correct", "mixed"]))
    batch, m = ds.emit()
    assert group_ids(batch) == [12, 20, 22]
    assert m["dynamic_sampling/carried_in_groups"] == 1 and m["train/num_gen_batches"] == 1
    assert m["dynamic_sampling/carried_over_groups"] == 0 and ds.num_kept_groups == 0


def test_without_carry_over_surplus_is_discarded_like_verl():
    ds = DynamicSamplingAccumulator(train_batch_size=2, group_size=G, carry_over=False)
    ds.add(*gen_batch(0, ["mixed", "mixed", "mixed", "wrong"]))
    batch, m = ds.emit()
    assert group_ids(batch) == [0, 1]
    assert m["dynamic_sampling/carried_over_groups"] == 0 and m["dynamic_sampling/discarded_groups"] == 1
    assert ds.num_kept_groups == 0 and not ds.ready()


def test_carried_groups_alone_can_fill_the_next_batch():
    ds = DynamicSamplingAccumulator(train_batch_size=1, group_size=G)
    ds.add(*gen_batch(0, ["mixed", "mixed2", "mixed"]))
    assert group_ids(ds.emit()[0]) == [0]
    assert ds.ready()  # two carried groups, no generation needed
    batch, m = ds.emit()
    assert group_ids(batch) == [1] and m["train/num_gen_batches"] == 0 and "dynamic_sampling/frac_all_wrong" not in m


# ----------------------------------------------------------------------------- the cap


def test_cap_with_on_cap_error_raises_a_helpful_error_like_verl():
    ds = DynamicSamplingAccumulator(train_batch_size=3, group_size=G, max_num_gen_batches=2, on_cap="error")
    ds.add(*gen_batch(0, ["mixed", "wrong"]))
    assert not ds.cap_reached()
    with pytest.raises(DynamicSamplingCapError) as err:
        ds.add(*gen_batch(10, ["correct", "wrong"]))
    msg = str(err.value)
    for hint in ("max_num_gen_batches", "on_cap='proceed'", "train_batch_size", "reward"):
        assert hint in msg
    assert ds.cap_reached() and ds.num_kept_groups == 1


def test_cap_with_on_cap_proceed_emits_the_groups_kept_so_far():
    ds = DynamicSamplingAccumulator(train_batch_size=3, group_size=G, max_num_gen_batches=2, on_cap="proceed")
    ds.add(*gen_batch(0, ["mixed", "wrong"]))
    assert not ds.should_stop_sampling()
    ds.add(*gen_batch(10, ["correct", "mixed2"]))
    assert ds.cap_reached() and not ds.ready() and ds.should_stop_sampling()
    batch, m = ds.emit()
    assert group_ids(batch) == [0, 11]
    assert m["dynamic_sampling/cap_reached"] == 1 and m["dynamic_sampling/emitted_groups"] == 2
    # the next step has a fresh generation budget
    assert ds.num_gen_batches == 0 and not ds.cap_reached()


def test_cap_reached_with_zero_kept_groups_raises_instead_of_an_empty_batch():
    ds = DynamicSamplingAccumulator(train_batch_size=2, group_size=G, max_num_gen_batches=1, on_cap="proceed")
    ds.add(*gen_batch(0, ["correct", "wrong"]))
    with pytest.raises(RuntimeError, match="zero kept groups"):
        ds.emit()


def test_unlimited_cap_keeps_sampling_and_emit_requires_readiness():
    ds = DynamicSamplingAccumulator(train_batch_size=2, group_size=G, max_num_gen_batches=0)
    for i in range(20):
        ds.add(*gen_batch(10 * i, ["wrong", "correct"]))
        assert not ds.should_stop_sampling()
    with pytest.raises(RuntimeError, match="keep calling add"):
        ds.emit()
    ds.add(*gen_batch(500, ["mixed", "mixed"]))
    assert ds.emit()[1]["train/num_gen_batches"] == 21


# ----------------------------------------------------------------------------- state round trip


def _savez_roundtrip(state):
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    buf.seek(0)
    with np.load(buf, allow_pickle=True) as f:  # pickle only for the object-dtype "text" field
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("carry_over", [True, False])
def test_state_round_trips_through_savez_and_continues_identically(carry_over):
    kw = dict(train_batch_size=3, group_size=G, max_num_gen_batches=3, on_cap="proceed", carry_over=carry_over)
    a = DynamicSamplingAccumulator(**kw)
    a.add(*gen_batch(0, ["mixed", "mixed", "mixed", "mixed", "wrong"]))
    a.emit()  # 1 carried over (when carry_over)
    a.add(*gen_batch(10, ["correct", "mixed2"]))  # mid-step: counters and pending groups are non-trivial
    state = a.state_dict()
    assert all(isinstance(v, (np.ndarray, int, float, str, bool)) for v in state.values())

    b = DynamicSamplingAccumulator(**kw)
    b.load_state_dict(_savez_roundtrip(state))
    for acc in (a, b):
        assert (acc.num_kept_groups, acc.num_gen_batches) == (a.num_kept_groups, a.num_gen_batches)
    future = [gen_batch(20, ["wrong", "mixed"]), gen_batch(30, ["mixed", "mixed", "correct"]),
              gen_batch(40, ["wrong", "wrong"]), gen_batch(50, ["correct", "mixed"]), gen_batch(60, ["mixed", "wrong"])]
    outs = []
    for acc in (a, b):
        out = []
        for batch, metric in future:
            acc.add(batch, metric)
            if acc.should_stop_sampling():
                out.append(acc.emit())
        outs.append(out)
    assert len(outs[0]) == len(outs[1]) >= 2
    for (ba, ma), (bb, mb) in zip(*outs):
        assert ma == mb
        assert ba.keys() == bb.keys()
        for k in ba:
            np.testing.assert_array_equal(ba[k], bb[k])
            assert ba[k].dtype == bb[k].dtype


def test_state_of_fresh_accumulator_round_trips_and_group_size_is_checked():
    a = DynamicSamplingAccumulator(train_batch_size=2, group_size=G)
    b = DynamicSamplingAccumulator(train_batch_size=2, group_size=G)
    b.load_state_dict(_savez_roundtrip(a.state_dict()))
    assert b.num_kept_groups == 0 and b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="group_size"):
        DynamicSamplingAccumulator(train_batch_size=2, group_size=8).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------- input validation


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="on_cap"):
        DynamicSamplingAccumulator(2, G, on_cap="crash")
    ds = DynamicSamplingAccumulator(train_batch_size=2, group_size=G)
    batch, acc = gen_batch(0, ["mixed", "wrong"])
    with pytest.raises(ValueError, match="group_size"):
        ds.add(batch, acc.reshape(4, 2))
    with pytest.raises(ValueError, match="leading dim"):
        ds.add({**batch, "extra": np.zeros(3)}, acc)
    with pytest.raises(ValueError, match="NaN"):
        ds.add(batch, np.where(acc == 0, np.nan, acc))
    ds.add(batch, acc)
    with pytest.raises(ValueError, match="same fields"):
        ds.add({k: v for k, v in batch.items() if k != "uid"}, acc)
    with pytest.raises(ValueError, match="pad every generation batch"):
        ds.add({**batch, "tokens": np.zeros((2 * G, 5), int)}, acc)


def test_score_filter_metric_takes_accuracy_for_the_fractions_separately():
    ds = DynamicSamplingAccumulator(train_batch_size=1, group_size=G, filter_metric="score")
    batch, acc = gen_batch(0, ["correct", "wrong"])
    score = np.array([[1.0, 1.0, 0.5, 1.0], [-1.0, -1.0, -1.0, -1.0]])  # overlong penalty on one sample
    ds.add(batch, score, acc=acc)
    out, m = ds.emit()
    assert group_ids(out) == [0]  # kept by the shaped score although all answers were correct
    assert m["dynamic_sampling/frac_all_correct"] == 0.5 and m["dynamic_sampling/frac_all_wrong"] == 0.5
