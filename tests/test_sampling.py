"""Temperature / top-k / top-p sampling frequencies match the target distribution (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dapo_jax.sampler import SamplingParams, sample_tokens
from dapo_jax.sampler.sampling import TOP_P_CANDIDATES, _block_size

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
    # The policy log-prob is the trainer's policy: softmax(logits / T), without top-k / top-p.
    scaled = LOGITS / params.temperature
    full = scaled - np.log(np.exp(scaled).sum())
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


def _numpy_target(logits: np.ndarray, top_p: float) -> np.ndarray:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.zeros(p.shape, bool)
        keep[order] = (np.cumsum(p[order]) - p[order]) < top_p
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("vocab,scale,top_p", [
    (997, 3.0, 1.0), (1000, 3.0, 1.0), (997, 2.0, 0.8), (997, 0.05, 0.5)],
    ids=["padded-vocab", "divisor-blocks", "top-p-from-candidates", "top-p-full-sort-fallback"])
def test_two_stage_draws_match_the_distribution(vocab, scale, top_p):
    # 997 (prime): 32 blocks of 32 with 27 padded slots, so the block stage and the padding matter;
    # 1000: 40 blocks of 25, reshaped in place. A flat distribution (scale 0.05) puts top_p outside
    # the 256 top-p candidates: the bisection path.
    assert _block_size(997) == 32 and _block_size(1000) == 25
    logits = np.random.RandomState(3).randn(vocab) * scale
    params = SamplingParams(temperature=1.0, top_p=top_p)
    keys = jax.random.split(jax.random.key(7), N)
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, logits.size))
    tokens, sample_lp, policy_lp = jax.jit(lambda k, l: sample_tokens(l, k, params))(keys, batch)
    tokens = np.asarray(tokens)
    target = _numpy_target(logits, top_p)
    if top_p < 1.0:  # the case exercises the path its name says
        top_mass = np.sort(_numpy_target(logits, 1.0))[::-1][:TOP_P_CANDIDATES].sum()
        assert (top_mass >= top_p) == (scale > 1), top_mass
        assert (target > 0).sum() > 3
    counts = np.bincount(tokens, minlength=logits.size)
    assert tokens.max() < logits.size and counts[target == 0].sum() == 0
    # Chi-square over tokens expected >= 5 times, the rest pooled into one bin.
    big = target * N >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(target[big], target[~big].sum()) * N
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(sample_lp), np.log(target[tokens]), atol=1e-4)
    full = logits - np.log(np.exp(logits).sum())
    np.testing.assert_allclose(np.asarray(policy_lp), full[tokens], atol=1e-4)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_bisection_cutoff_equals_the_sorted_cutoff(top_p):
    from dapo_jax.sampler.sampling import _nucleus_cutoff, _nucleus_cutoff_by_bisection
    rng = np.random.RandomState(int(top_p * 1000))
    x = rng.randn(6, 700).astype(np.float32) * np.array([[0.01], [0.3], [1], [3], [10], [1]], np.float32)
    x[5, :300] = np.round(x[5, :300])  # many ties
    x[1, :50] = np.finfo(np.float32).min  # excluded by an earlier top-k
    x = jnp.asarray(x)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    want = _nucleus_cutoff(jnp.sort(x, axis=-1)[..., ::-1], lse, top_p)
    got = jax.jit(_nucleus_cutoff_by_bisection, static_argnums=2)(x, lse, top_p)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_block_size_divides_real_vocabularies():
    for vocab in (151936, 152064, 32000):  # Qwen2.5 small / large, Llama-2
        b = _block_size(vocab)
        assert vocab % b == 0 and vocab ** 0.5 / 4 <= b <= 4 * vocab ** 0.5, (vocab, b)


@pytest.mark.parametrize("params", [
    SamplingParams(greedy=True), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.9, top_p=0.8)], ids=str)
def test_vocab_major_logits_draw_the_same_tokens(params):
    """The out-major engine samples [V, B] logits in place: same keys, same tokens and log-probs."""
    logits = jnp.asarray(np.random.RandomState(5).randn(6, 1000) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(11), 6)
    rows = jax.jit(lambda k, l: sample_tokens(l, k, params))(keys, logits)
    cols = jax.jit(lambda k, l: sample_tokens(l, k, params, vocab_axis=0))(keys, logits.T)
    np.testing.assert_array_equal(np.asarray(rows[0]), np.asarray(cols[0]))
    for a, b in zip(rows[1:], cols[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
