"""Temperature / top-k / top-p sampling frequencies match the target distribution (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dapo_jax.sampler import SamplingParams, sample_tokens

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
N = 20_000


def _target(params: SamplingParams) -> np.ndarray:
    """The distribution the sampler should draw from, computed independently in numpy."""
    x = LOGITS / (params.temperature if params.temperature > 0 else 1.0)
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if params.top_k:
        keep &= p >= np.sort(p)[::-1][params.top_k - 1]
    if params.top_p < 1.0:
        order = np.argsort(-p)
        mass_before = np.cumsum(p[order]) - p[order]
        keep_sorted = np.zeros_like(keep)
        keep_sorted[order] = mass_before < params.top_p
        keep &= keep_sorted
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.4, top_k=3), SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=5)], ids=str)
def test_sampling_frequencies_match_target_distribution(params):
    keys = jax.random.split(jax.random.key(1234), N)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (N, LOGITS.size))
    tokens, sample_lp, policy_lp = jax.jit(lambda k, l: sample_tokens(l, k, params))(keys, logits)
    tokens = np.asarray(tokens)
    target = _target(params)
    counts = np.bincount(tokens, minlength=LOGITS.size)
    assert counts[target == 0].sum() == 0, "sampled a token outside top-k/top-p"
    support = target > 0
    chi = stats.chisquare(counts[support], target[support] * N)
    assert chi.pvalue > 1e-3, (counts, target * N)
    np.testing.assert_allclose(np.asarray(sample_lp), np.log(target[tokens]), atol=1e-5)
    full = LOGITS - np.log(np.exp(LOGITS).sum())
    np.testing.assert_allclose(np.asarray(policy_lp), full[tokens], atol=1e-5)


def test_greedy_picks_argmax_and_bad_params_are_rejected():
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 8), jnp.float32)
    tok, slp, _ = sample_tokens(logits, jax.random.split(jax.random.key(0), 4),
                                SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(logits), -1))
    assert np.all(np.asarray(slp) == 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
