"""Soft overlong punishment (Eq. 13) and overlong filtering."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_jax.algo import compute_policy_loss, is_truncated, overlong_filter_mask, overlong_penalty
from dapo_jax.algo import overlong as ol


def eq13(length, l_max, l_cache, factor=1.0):
    """Eq. 13 written out, one length at a time."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache * factor
    return -factor


def test_penalty_matches_eq13_and_dapo_settings():
    l_max, l_cache = 20480, 4096  # the paper's setting
    lengths = np.array([0, 1, 16383, 16384, 16385, 18432, 20479, 20480, 20481, 30000])
    got = np.asarray(overlong_penalty(lengths, max_response_length=l_max, overlong_buffer_len=l_cache))
    np.testing.assert_allclose(got, [eq13(x, l_max, l_cache) for x in lengths], rtol=1e-6, atol=1e-7)
    assert got[3] == 0.0 and got[5] == pytest.approx(-0.5) and got[7] == -1.0 and got[8] == -1.0


def test_penalty_factor_scales_and_matches_verl_inside_limit():
    lengths = np.arange(0, 13)
    got = np.asarray(overlong_penalty(lengths, max_response_length=12, overlong_buffer_len=4, penalty_factor=0.5))
    verl = [min(-(x - (12 - 4)) / 4 * 0.5, 0) for x in lengths]  # verl's DAPO reward manager
    np.testing.assert_allclose(got, verl, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    l_max=st.integers(2, 5000),
    cache_frac=st.floats(0.01, 0.99),
    factor=st.floats(0.0, 5.0),
    lengths=st.lists(st.integers(0, 10000), min_size=32, max_size=32),
)
def test_penalty_is_continuous_and_non_increasing(l_max, cache_frac, factor, lengths):
    l_cache = min(max(1, int(l_max * cache_frac)), l_max - 1)
    lengths = np.sort(np.asarray(lengths, np.int32))
    p = np.asarray(overlong_penalty(lengths, max_response_length=l_max, overlong_buffer_len=l_cache,
                                    penalty_factor=factor), np.float64)
    tol = 1e-5 * (1 + factor)
    assert np.all(np.diff(p) <= tol)  # non-increasing
    # Lipschitz with constant factor / L_cache: no jump anywhere, in particular at L_max - L_cache and L_max
    assert np.all(np.abs(np.diff(p)) <= factor / l_cache * np.diff(lengths) + tol)
    assert np.all(p <= 0) and np.all(p >= -factor - tol)
    edges = np.asarray(overlong_penalty(np.array([l_max - l_cache, l_max, l_max + 1]), max_response_length=l_max,
                                        overlong_buffer_len=l_cache, penalty_factor=factor))
    np.testing.assert_allclose(edges, [0.0, -factor, -factor], atol=tol)


def test_penalty_validates_arguments():
    with pytest.raises(ValueError, match="0 < L_cache < max_response_length"):
        overlong_penalty(np.array([1]), max_response_length=100, overlong_buffer_len=100)
    with pytest.raises(ValueError, match="0 < L_cache"):
        overlong_penalty(np.array([1]), max_response_length=100, overlong_buffer_len=0)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(np.array([1]), max_response_length=100, overlong_buffer_len=10, penalty_factor=-1)
    with pytest.raises(ValueError, match="integer token counts"):
        overlong_penalty(np.array([1.5]), max_response_length=100, overlong_buffer_len=10)


def test_filter_zeroes_truncated_rows_and_removes_them_from_token_mean():
    rng = np.random.default_rng(0)
    mask = np.ones((4, 5), np.float32)
    mask[2, 3:] = 0
    truncated = np.array([False, True, False, True])
    new_mask = np.asarray(overlong_filter_mask(mask, truncated))
    assert new_mask.dtype == mask.dtype
    np.testing.assert_array_equal(new_mask, mask * ~truncated[:, None])
    # the filtered samples' tokens leave the token-mean denominator
    old = rng.normal(size=(4, 5)).astype(np.float32)
    new = old + 0.1 * rng.normal(size=(4, 5)).astype(np.float32)
    adv = rng.normal(size=4).astype(np.float32)
    keep = ~truncated
    full, _ = compute_policy_loss(old, new, adv, new_mask)
    kept_only, _ = compute_policy_loss(old[keep], new[keep], adv[keep], mask[keep])
    np.testing.assert_allclose(float(full), float(kept_only), rtol=1e-6)


def test_is_truncated_means_at_limit_without_eos():
    got = is_truncated(np.array([10, 10, 7, 7]), np.array([True, False, True, False]), max_response_length=10)
    np.testing.assert_array_equal(got, [False, True, False, False])


def test_compiles_once_per_input_shape():
    before = ol._penalty._cache_size()
    for l_max, l_cache, factor in [(100, 10, 1.0), (200, 50, 0.5), (4096, 512, 2.0)]:
        overlong_penalty(np.arange(11, dtype=np.int32), max_response_length=l_max, overlong_buffer_len=l_cache,
                         penalty_factor=factor)
    assert ol._penalty._cache_size() == before + 1
    before = ol._filter._cache_size()
    for seed in range(3):
        overlong_filter_mask(np.ones((3, 11), np.float32), np.random.default_rng(seed).random(3) > 0.5)
    assert ol._filter._cache_size() == before + 1
