"""Chunked per-token log-probs equal log_softmax-gather of full logits and don't scale with T x V."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import models
from dapo_jax.models.qwen2 import lm_head_weight


def test_token_logprobs_equal_log_softmax_gather_of_full_logits(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    model, cfg = models.load_pretrained(path)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, size=(3, 11))
    mask = np.ones((3, 11), np.int32)
    mask[0, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    targets = mask.copy()
    targets[:, :6] = 0  # only "response" tokens
    logits = np.asarray(models.forward(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    logz = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref = np.zeros(ids.shape)
    ref_ent = np.zeros(ids.shape)
    for b in range(3):
        for t in range(1, 11):
            if targets[b, t]:
                ref[b, t] = logz[b, t - 1, ids[b, t]]
                p = np.exp(logz[b, t - 1])
                ref_ent[b, t] = -(p * logz[b, t - 1]).sum()
    for chunk in (1, 3, 64):  # chunk sizes that do and don't divide T - 1
        lp, ent = models.token_logprobs(model, jnp.asarray(ids), jnp.asarray(mask),
                                        jnp.asarray(targets), return_entropy=True, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=2e-5)


def test_token_logprobs_gradient_matches_full_logits_gradient(hf_checkpoints):
    path, _ = hf_checkpoints["llama_gqa_untied"]
    model, cfg = models.load_pretrained(path)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, cfg.vocab_size, size=(2, 9)))
    mask = jnp.ones((2, 9), jnp.int32)

    def chunked(p):
        return models.sequence_logprobs(p, cfg, ids, mask, chunk_size=2)[0].sum()

    def full(p):
        h, _ = models.decoder_apply(p, cfg, ids, mask)
        lz = jax.nn.log_softmax(models.lm_logits(p, cfg, h)[:, :-1], axis=-1)
        return jnp.take_along_axis(lz, ids[:, 1:, None], axis=-1).sum()

    g1, g2 = jax.grad(chunked)(model.params()), jax.grad(full)(model.params())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


def test_peak_memory_does_not_scale_with_sequence_times_vocab():
    b, t, chunk = 2, 1024, 32

    def temp_bytes(vocab, full_logits=False):
        cfg = models.preset("tiny", vocab_size=vocab, num_layers=1)
        params = jax.eval_shape(lambda: models.init_model(cfg).params())
        ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

        def loss(p, ids):
            mask = jnp.ones_like(ids)
            if full_logits:
                h, _ = models.decoder_apply(p, cfg, ids, mask)
                lz = jax.nn.log_softmax(models.lm_logits(p, cfg, h)[:, :-1], axis=-1)
                return jnp.take_along_axis(lz, ids[:, 1:, None], axis=-1).sum()
            return models.sequence_logprobs(p, cfg, ids, mask, chunk_size=chunk)[0].sum()

        compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # Growing the vocabulary by dV adds B*T*dV fp32 logits to the naive loss's peak, but only
    # O(B*chunk*dV) (plus the [dV, D] embedding gradient) to the chunked one.
    v1, v2 = 4096, 16384
    logits_growth = b * t * (v2 - v1) * 4
    chunked = temp_bytes(v2) - temp_bytes(v1)
    naive = temp_bytes(v2, full_logits=True) - temp_bytes(v1, full_logits=True)
    assert naive >= logits_growth, (naive, logits_growth)
    chunk_growth = b * chunk * (v2 - v1) * 4
    assert chunked <= 4 * chunk_growth + (v2 - v1) * 64 * 4 * 2, (chunked, chunk_growth)
    assert chunked < 0.2 * logits_growth, (chunked, logits_growth)


def test_only_scored_positions_are_projected_and_their_gradients_are_exact(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    model, cfg = models.load_pretrained(path)
    ids = jnp.asarray(np.random.RandomState(2).randint(3, cfg.vocab_size, size=(3, 13)))
    mask = jnp.ones((3, 13), jnp.int32)
    targets = np.zeros((3, 13), np.int32)
    targets[0, 9:], targets[1, 4:7], targets[2, 12] = 1, 1, 1  # "responses" of 4, 3 and 1 tokens
    targets = jnp.asarray(targets)

    def chunked(p):
        return models.sequence_logprobs(p, cfg, ids, mask, targets, chunk_size=2)[0].sum()

    def full(p):
        h, _ = models.decoder_apply(p, cfg, ids, mask)
        lz = jax.nn.log_softmax(models.lm_logits(p, cfg, h)[:, :-1], axis=-1)
        picked = jnp.take_along_axis(lz, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(targets[:, 1:] > 0, picked, 0.0))

    np.testing.assert_allclose(chunked(model.params()), full(model.params()), rtol=1e-5)
    g1, g2 = jax.grad(chunked)(model.params()), jax.grad(full)(model.params())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)

    # The skip itself: with 4 scored positions at most per row and chunks of 2, only the first
    # two chunks of the reordered rows are projected; every other position comes back as 0.
    h, _ = models.decoder_apply(model.params(), cfg, ids, mask)
    w = lm_head_weight(model.params(), cfg)
    scored = targets[:, 1:] > 0
    lp, _ = models.chunked_token_logprobs(h[:, :-1], w, ids[:, 1:], chunk_size=2, scored=scored)
    every, _ = models.chunked_token_logprobs(h[:, :-1], w, ids[:, 1:], chunk_size=2)
    np.testing.assert_allclose(np.where(scored, lp, 0.0), np.where(scored, every, 0.0), atol=1e-6)
    assert np.count_nonzero(np.asarray(lp)) == 3 * 4  # 2 chunks x 2 positions per row


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_loop_gradients_of_logprobs_and_entropy_match_full_logits(temperature):
    k = jax.random.split(jax.random.key(3), 5)
    b, t, d, v = 2, 7, 6, 11
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (d, v))
    tgt = jax.random.randint(k[2], (b, t), 0, v)
    scored = jax.random.bernoulli(k[3], 0.6, (b, t))
    a_lp, a_ent = jax.random.normal(k[4], (2, b, t))

    def ours(h, w):
        lp, ent = models.chunked_token_logprobs(h, w, tgt, chunk_size=3, temperature=temperature,
                                                return_entropy=True, scored=scored)
        return jnp.sum(jnp.where(scored, a_lp * lp + a_ent * ent, 0.0))

    def full(h, w):
        z = jnp.einsum("btd,dv->btv", h, w) / temperature
        logp = jax.nn.log_softmax(z, axis=-1)
        lp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.sum(jnp.where(scored, a_lp * lp + a_ent * ent, 0.0))

    np.testing.assert_allclose(ours(h, w), full(h, w), rtol=1e-5)
    for got, want in zip(jax.grad(ours, (0, 1))(h, w), jax.grad(full, (0, 1))(h, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
