"""Group-relative advantages (Eq. 9): numpy reference, layouts, properties, compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dapo_jax.algo import advantages as adv_mod
from dapo_jax.algo import compute_grpo_advantages


def np_grpo(scores, ids, eps=1e-6, norm_by_std=True):
    """verl's compute_grpo_outcome_advantage, in plain numpy: unbiased std, singleton -> mean 0, std 1."""
    scores = np.asarray(scores, np.float64)
    out = np.empty_like(scores)
    for g in np.unique(ids):
        sel = ids == g
        x = scores[sel]
        mean, std = (0.0, 1.0) if x.size == 1 else (x.mean(), x.std(ddof=1))
        out[sel] = (x - mean) / (std + eps) if norm_by_std else x - mean
    return out


def test_2d_layout_matches_numpy_reference():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 6)).astype(np.float32)
    ids = np.repeat(np.arange(4), 6)
    for norm in (True, False):
        got = compute_grpo_advantages(scores, norm_by_std=norm)
        assert got.shape == (4, 6)
        np.testing.assert_allclose(np.asarray(got).ravel(), np_grpo(scores.ravel(), ids, norm_by_std=norm),
                                   rtol=1e-5, atol=1e-6)


def test_flat_contiguous_layout_matches_2d():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(24,)).astype(np.float32)
    flat = compute_grpo_advantages(scores, group_size=6)
    np.testing.assert_allclose(flat, np.asarray(compute_grpo_advantages(scores.reshape(4, 6))).ravel(), rtol=1e-6)


def test_non_contiguous_group_index_with_singletons_matches_numpy():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(10,)).astype(np.float32)
    ids = np.array([7, 3, 7, 100, 3, 7, 3, -2, 3, 7])  # -2 and 100 are groups of one
    got = compute_grpo_advantages(scores, ids)
    np.testing.assert_allclose(got, np_grpo(scores, ids), rtol=1e-5, atol=1e-6)
    # a group of one: mean 0, std 1 (verl)
    np.testing.assert_allclose(float(got[3]), scores[3] / (1 + 1e-6), rtol=1e-6)
    got_dr = compute_grpo_advantages(scores, ids, norm_by_std=False)
    np.testing.assert_allclose(got_dr, np_grpo(scores, ids, norm_by_std=False), rtol=1e-5, atol=1e-6)


def test_group_index_path_is_jittable_with_dense_ids():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(8,)).astype(np.float32)
    ids = np.array([0, 1, 0, 1, 2, 2, 1, 0], np.int32)
    f = jax.jit(lambda s, i: compute_grpo_advantages(s, i, num_groups=3))
    np.testing.assert_allclose(f(scores, ids), np_grpo(scores, ids), rtol=1e-5, atol=1e-6)


def test_integer_and_bool_scores_are_accepted():
    got = compute_grpo_advantages(np.array([[1, 0, 1, 1]]))
    np.testing.assert_allclose(got, np_grpo(np.array([1, 0, 1, 1]), np.zeros(4)).reshape(1, 4), rtol=1e-5)
    assert jnp.issubdtype(got.dtype, jnp.floating)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="group_index .* or group_size"):
        compute_grpo_advantages(np.zeros(6))
    with pytest.raises(ValueError, match="divide"):
        compute_grpo_advantages(np.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="integer ids"):
        compute_grpo_advantages(np.zeros(3), np.array(["a", "b", "a"]))
    with pytest.raises(ValueError, match="rows"):
        compute_grpo_advantages(np.zeros((2, 3)), np.zeros(6, int))


# quarter-integers: exactly representable, like DAPO's +-1 accuracy reward plus an overlong penalty
_score = st.integers(-8, 8).map(lambda k: k / 4)


@settings(max_examples=50, deadline=None)
@given(scores=hnp.arrays(np.float32, (3, 5), elements=_score))
def test_advantages_have_zero_group_mean_and_constant_groups_get_zero(scores):
    adv = np.asarray(compute_grpo_advantages(scores), np.float64)
    for p in range(3):
        if np.ptp(scores[p]) == 0:
            assert np.all(adv[p] == 0.0)
        else:
            assert abs(adv[p].mean()) <= 1e-6 * (1 + np.abs(adv[p]).max())
            # normalised by the unbiased std: sample std of the advantages ~ 1
            assert abs(adv[p].std(ddof=1) - 1) < 1e-4


@settings(max_examples=30, deadline=None)
@given(scores=hnp.arrays(np.float32, (12,), elements=_score),
       ids=hnp.arrays(np.int64, (12,), elements=st.integers(0, 4)))
def test_segment_path_properties_and_reference(scores, ids):
    adv = np.asarray(compute_grpo_advantages(scores, ids), np.float64)
    np.testing.assert_allclose(adv, np_grpo(scores, ids), rtol=1e-5, atol=1e-5)
    for g in np.unique(ids):
        sel = ids == g
        if sel.sum() > 1 and np.ptp(scores[sel]) == 0:
            assert np.all(adv[sel] == 0)
        elif sel.sum() > 1:
            assert abs(adv[sel].mean()) <= 1e-6 * (1 + np.abs(adv[sel]).max())


def test_compiles_once_per_input_shape():
    rng = np.random.default_rng(4)
    before_2d = adv_mod._grouped_2d._cache_size()
    before_seg = adv_mod._grouped_segments._cache_size()
    for _ in range(3):
        compute_grpo_advantages(rng.normal(size=(7, 3)).astype(np.float32))
        # different numbers of distinct groups, same shape: still one program
        ids = rng.integers(0, rng.integers(1, 9), size=9)
        compute_grpo_advantages(rng.normal(size=(9,)).astype(np.float32), ids)
    assert adv_mod._grouped_2d._cache_size() == before_2d + 1
    assert adv_mod._grouped_segments._cache_size() == before_seg + 1
