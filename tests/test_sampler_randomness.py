"""Rollout randomness and log-probs, end to end through the engine and the rollout driver.

Randomness: on a model whose next-token distribution is a fixed, known law over six tokens whatever
the context, every drawn token must be an independent draw from that law. Chi-square tests over
tables of token *pairs* (consecutive steps, two samples of a prompt, two prompts) see a reused
PRNG key, which per-token frequencies cannot: a reused key repeats the token. Seeds: a seed
reproduces its rollout exactly, and another seed (the next RL step's) or sample index gives another.

Log-probs: at temperature 0.7 with top-k / top-p, `Sample.sampling_logprobs` is the log-prob under
the distribution actually sampled (temperature, truncation, renormalisation) and `Sample.logprobs`
the log-prob under the policy at the sampling temperature, log_softmax(logits / T) without top-k /
top-p (the policy the trainer optimises; the contract in
`sampler.sampling.sample_tokens` and `rollout.Sample`). Both are checked against a full forward pass
of the generated sequence through the training-side forward, transformed by numpy code written here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dapo_jax import models
from dapo_jax.sampler import Engine, RolloutDriver, RolloutRequest, SamplingParams

EOS = 2
MAX_PROMPT = 16
MAX_NEW = 64
SLOTS = 64
# A p-value this small under correct sampling happens once in a million seeds; a reused key gives
# p ~ 0 (every pair on the table's diagonal). The tests are deterministic for the fixed seeds here
# and stay green for any other random stream of a correct sampler.
P_MIN = 1e-6

# The known next-token law of the "context-free" model: six tokens spread over several of the
# sampler's vocabulary blocks (128 = 16 blocks of 8), every other token at logit -40 (never drawn).
SUPPORT = np.array([3, 9, 17, 40, 77, 120])
SUPPORT_LOGITS = np.array([0.8, 0.4, 0.0, 0.0, -0.4, -0.8])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, size=n)] for n in lengths]


def _tokens(result):
    return [[s.tokens.tolist() for s in samples] for samples in result.samples]


@pytest.fixture(scope="module")
def tiny(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    model, cfg = models.load_pretrained(path)
    return model.params(), cfg


@pytest.fixture(scope="module")
def engine(tiny):
    """One engine for every test here (its compiled steps are shared); drivers swap the weights."""
    _, cfg = tiny
    return Engine(cfg, max_concurrent_decodes=SLOTS, max_prefill_length=MAX_PROMPT,
                  max_target_length=MAX_PROMPT + MAX_NEW, stop_token_ids=[EOS])


def _driver(engine, params):
    return RolloutDriver(engine, params, steps_per_sync=16, progress=False)


def context_free_params(params, cfg):
    """The tiny model rewired so its logits are SUPPORT_LOGITS at every position, for any input.

    Every embedding row is the same vector and every layer adds exactly zero (attention output and
    MLP down projections zeroed), so the residual stream is that vector everywhere; the final norm
    keeps one coordinate (about 1.0) and the LM head maps it to the chosen logits.
    """
    p = jax.tree.map(np.array, params)
    p["embed"][:] = 1.0
    p["layers"]["o_kernel"][:] = 0.0
    p["layers"]["down_kernel"][:] = 0.0
    p["final_norm"][:] = 0.0
    p["final_norm"][0] = 1.0
    p["lm_head"][:] = 0.0
    p["lm_head"][0, :] = -40.0
    p["lm_head"][0, SUPPORT] = SUPPORT_LOGITS
    assert not cfg.tie_word_embeddings
    return p


# -- 1. every token an independent draw ----------------------------------------------------------

@pytest.fixture(scope="module")
def context_free_rollout(tiny, engine):
    """8 prompts x 8 samples x 64 tokens of the context-free model, as [prompt, sample, step]."""
    params, cfg = tiny
    drv = _driver(engine, context_free_params(params, cfg))
    prompts = _prompts(cfg.vocab_size, lengths=(5, 9, 3, 12, 7, 16, 1, 10))
    res = drv.generate([RolloutRequest(p, n=8, max_new_tokens=MAX_NEW) for p in prompts], seed=11,
                       sampling=SamplingParams(temperature=1.0))
    toks = np.asarray(_tokens(res))
    assert toks.shape == (8, 8, MAX_NEW)  # EOS is never drawn: every sample runs to the limit
    return toks, res


def assert_independent_pairs(a, b, what):
    """Chi-square test of the (a, b) pair table against pairs of independent draws from the law."""
    p = _softmax(SUPPORT_LOGITS)
    ia, ib = np.searchsorted(SUPPORT, a.ravel()), np.searchsorted(SUPPORT, b.ravel())
    table = np.zeros((len(SUPPORT), len(SUPPORT)))
    np.add.at(table, (ia, ib), 1)
    expected = np.outer(p, p) * ia.size
    assert expected.min() >= 5, "too few pairs for a chi-square test"
    pvalue = stats.chisquare(table.ravel(), expected.ravel()).pvalue
    assert pvalue > P_MIN, (f"{what}: chi-square p = {pvalue:.1e}; {np.mean(ia == ib):.0%} of the "
                            f"pairs repeat a token ({np.sum(p * p):.0%} expected)\n{table}")


def _disjoint_lag_pairs(toks, lag):
    """(x_t, x_{t+lag}) for t in alternate runs of `lag` steps, so no token is in two pairs."""
    t = np.arange(toks.shape[-1] - lag)
    t = t[(t // lag) % 2 == 0]
    return toks[..., t], toks[..., t + lag]


def test_context_free_model_draws_tokens_from_its_known_distribution(context_free_rollout):
    toks, res = context_free_rollout
    p = _softmax(SUPPORT_LOGITS)
    assert np.isin(toks, SUPPORT).all()
    counts = np.array([(toks == t).sum() for t in SUPPORT])
    assert stats.chisquare(counts, p * toks.size).pvalue > P_MIN, (counts, p * toks.size)
    # The model is what it was built to be: sampling log-prob = log p(token) at every step.
    want = np.log(p)[np.searchsorted(SUPPORT, toks)]
    got = np.asarray([[s.sampling_logprobs for s in ss] for ss in res.samples])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_tokens_of_a_sample_are_independent_across_decode_steps(context_free_rollout, lag):
    """Catches a decode key that does not change with the step (or repeats every `lag` steps)."""
    toks, _ = context_free_rollout
    assert_independent_pairs(*_disjoint_lag_pairs(toks, lag), f"tokens {lag} steps apart")


def test_samples_of_a_prompt_are_independent(context_free_rollout):
    """Catches the n samples of a prompt sharing one key (they would be the same sequence)."""
    toks, _ = context_free_rollout
    assert_independent_pairs(toks[:, 0::2], toks[:, 1::2], "samples 2j and 2j+1 of a prompt")


def test_different_prompts_draw_independent_streams(context_free_rollout):
    """Catches keys that ignore the request: the model ignores the prompt, only the key differs."""
    toks, _ = context_free_rollout
    assert_independent_pairs(toks[0::2], toks[1::2], "prompts 2r and 2r+1, same sample index")


# -- 2. seeds ------------------------------------------------------------------------------------

SEED_REQUESTS = dict(lengths=(6, 3, 11), n=4, max_new_tokens=12)


@pytest.fixture(scope="module")
def seeded(tiny, engine):
    """The random-weight model's rollouts for seeds 7, 7 again and 8 (consecutive RL steps)."""
    params, cfg = tiny
    drv = _driver(engine, params)
    reqs = [RolloutRequest(p, n=SEED_REQUESTS["n"], max_new_tokens=SEED_REQUESTS["max_new_tokens"])
            for p in _prompts(cfg.vocab_size, SEED_REQUESTS["lengths"], seed=1)]
    sp = SamplingParams(temperature=1.0)
    return {name: drv.generate(reqs, seed=seed, sampling=sp)
            for name, seed in (("a", 7), ("a_again", 7), ("b", 8))}


def test_same_seed_reproduces_tokens_and_logprobs_exactly(seeded):
    a, again = seeded["a"], seeded["a_again"]
    assert _tokens(a) == _tokens(again)
    for x, y in zip(a.samples, again.samples):
        for s, t in zip(x, y):
            np.testing.assert_array_equal(s.logprobs, t.logprobs)
            np.testing.assert_array_equal(s.sampling_logprobs, t.sampling_logprobs)


def test_samples_and_successive_seeds_give_different_sequences(seeded):
    """Two sequences from independent keys coincide only if both stop at once (about 1/128**2 for
    these near-uniform random weights); shared keys make every pair coincide. One coincidence is
    tolerated so the test holds for any random stream of a correct sampler."""
    a, b = _tokens(seeded["a"]), _tokens(seeded["b"])
    n = SEED_REQUESTS["n"]
    same_samples = sum(seqs[i] == seqs[j] for seqs in a for i in range(n) for j in range(i + 1, n))
    assert same_samples <= 1, a
    same_across_seeds = sum(x == y for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    assert same_across_seeds <= 1, (a, b)


# -- 3. log-probs at temperature != 1 with top-k / top-p ----------------------------------------

# Random weights give near-uniform logits; a larger LM head makes them peaked (std ~1.5: the top 5
# tokens hold ~60% of the mass at T=0.7, a top-p 0.8 nucleus ~15 of 128 tokens) so that top-k and
# top-p cut real mass, and a larger EOS column makes ~40% of the samples stop on EOS.
LM_HEAD_SCALE = 15.0
EOS_SCALE = 1.5


# The engine's logits match the reference's to ~1e-6; a row whose top-k or top-p boundary is closer
# than this (in tempered logits, or in nucleus mass) can fall either way, so its truncated log-prob
# is not compared (a fraction of a percent of the rows; the policy log-prob still is).
BOUNDARY_TOLERANCE = 2e-5


def reference_logprobs(logits: np.ndarray, sp: SamplingParams):
    """(log-probs [V] of the sampling distribution, -inf outside it; kept-token mask [V]; whether a
    boundary is within BOUNDARY_TOLERANCE), in float64 numpy.

    Temperature divides the logits; top-k keeps the k largest; top-p then keeps the smallest set of
    most likely tokens of the top-k-renormalised distribution whose mass reaches top_p (a token is
    kept when the mass strictly before it is < top_p); the kept tokens are renormalised. This is the
    order in which transformers' logits warpers apply them.
    """
    x = logits.astype(np.float64) / sp.temperature
    keep = np.ones(x.shape, bool)
    ambiguous = False
    if sp.top_k:
        desc = np.sort(x)[::-1]
        keep &= x >= desc[sp.top_k - 1]
        ambiguous |= desc[sp.top_k - 1] - desc[sp.top_k] < BOUNDARY_TOLERANCE
    if sp.top_p < 1.0:
        q = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        q /= q.sum()
        order = np.argsort(-q, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        nucleus = np.zeros_like(keep)
        nucleus[order] = before < sp.top_p
        keep &= nucleus
        ambiguous |= np.abs(before - sp.top_p).min() < BOUNDARY_TOLERANCE
    lse = np.log(np.exp(x[keep] - x[keep].max()).sum()) + x[keep].max()
    return np.where(keep, x - lse, -np.inf), keep, ambiguous


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - (np.log(np.exp(x - x.max()).sum()) + x.max())


@pytest.fixture(scope="module")
def peaked(tiny):
    params, cfg = tiny
    p = jax.tree.map(np.array, params)
    p["lm_head"] *= LM_HEAD_SCALE
    p["lm_head"][:, EOS] *= EOS_SCALE
    return p, models.model_from_params(cfg, jax.tree.map(jnp.asarray, p)), cfg


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=0.7, top_k=8, top_p=0.7)],
    ids=["T0.7", "T0.7-topk5", "T0.7-topp0.8", "T0.7-topk8-topp0.7"])
def test_logprobs_equal_full_forward_recomputation_with_temperature_and_truncation(peaked, engine,
                                                                                   sp):
    params, model, cfg = peaked
    drv = _driver(engine, params)
    # 96 samples over 64 slots, unequal budgets: slots finish at different steps and get refilled.
    prompts = _prompts(cfg.vocab_size, lengths=(4, 11, 7, 16, 2, 9), seed=2)
    reqs = [RolloutRequest(p, n=16, max_new_tokens=8 + 4 * i) for i, p in enumerate(prompts)]
    res = drv.generate(reqs, seed=5, sampling=sp)

    # Reference: every (prompt + response) through the training-side forward in one batch.
    seqs = [(p, s) for p, ss in zip(prompts, res.samples) for s in ss]
    width = MAX_PROMPT + MAX_NEW
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, s) in enumerate(seqs):
        full = p + s.tokens.tolist()
        ids[i, :len(full)] = full
        mask[i, :len(full)] = 1
    logits = np.asarray(models.forward(model, jnp.asarray(ids), jnp.asarray(mask)))

    tokens = skipped = 0
    renormalised = 0.0
    for i, (p, s) in enumerate(seqs):
        for t, tok in enumerate(s.tokens):
            row = logits[i, len(p) - 1 + t]  # the logits that predicted response token t
            where = f"sample {i} step {t}"
            np.testing.assert_allclose(s.logprobs[t], _log_softmax(row / sp.temperature)[tok],
                                       atol=1e-5, err_msg=f"policy log-prob at T, {where}")
            tokens += 1
            want, keep, ambiguous = reference_logprobs(row, sp)
            if ambiguous:
                skipped += 1
                continue
            assert keep[tok], f"{where}: token {tok} outside the top-k/top-p set"
            np.testing.assert_allclose(s.sampling_logprobs[t], want[tok], atol=1e-5,
                                       err_msg=f"sampling log-prob, {where}")
            renormalised = max(renormalised,
                               abs(want[tok] - _log_softmax(row / sp.temperature)[tok]))
    # Enough steps for the checks to mean something, and both ways of finishing among them.
    assert tokens >= 500 and skipped <= 0.01 * tokens, (tokens, skipped)
    assert {s.finish_reason for _, s in seqs} == {"eos", "length"}
    if sp.top_k or sp.top_p < 1.0:  # truncation changed the log-probs: renormalisation is checked
        assert renormalised > 0.05
