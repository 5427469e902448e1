"""The NNX Qwen2/Llama decoder matches transformers' PyTorch models; padding and KV cache are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dapo_jax import models
from tests.conftest import TINY_HF_CONFIGS


def _batch(vocab: int, seed: int = 0):
    """Rows with left padding, right padding and none (mixed lengths)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(3, 9))
    mask = np.ones((3, 9), np.int32)
    mask[0, :3] = 0  # left padded
    mask[1, 6:] = 0  # right padded
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def _torch_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_logits_match_transformers_with_left_and_right_padding(hf_checkpoints, name):
    path, hf_model = hf_checkpoints[name]
    model, cfg = models.load_pretrained(path)
    assert cfg.architecture == ("llama" if name.startswith("llama") else "qwen2")
    ids, mask = _batch(cfg.vocab_size)
    ours = np.asarray(models.forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    ref = _torch_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    # Padding must not leak: a left-padded row equals the same row without padding.
    alone = np.asarray(models.forward(model, jnp.asarray(ids[:1, 3:]), jnp.ones((1, 6), jnp.int32)))
    np.testing.assert_allclose(ours[0, 3:], alone[0], atol=1e-5)


def test_scan_unrolled_and_remat_give_identical_logits_and_grads(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    ids, mask = _batch(128)
    results = []
    for scan, remat in [(True, "none"), (False, "none"), (True, "full"), (False, "dots")]:
        model, cfg = models.load_pretrained(path, scan_layers=scan, remat=remat)

        def loss(p, cfg=cfg):
            h, _ = models.decoder_apply(p, cfg, jnp.asarray(ids), jnp.asarray(mask))
            return jnp.sum(models.lm_logits(p, cfg, h) ** 2) * 1e-3

        val, grads = jax.jit(jax.value_and_grad(loss))(model.params())
        results.append((val, grads))
    for val, grads in results[1:]:
        np.testing.assert_allclose(val, results[0][0], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads, results[0][1])


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "llama_gqa_untied"])
def test_kv_cache_decode_reproduces_full_forward_position_by_position(hf_checkpoints, name):
    # The sampler's decode layouts get the same check in tests/test_decode_layout.py.
    path, _ = hf_checkpoints[name]
    model, cfg = models.load_pretrained(path)
    params = model.params()
    rng = np.random.RandomState(1)
    total = 10
    seq = rng.randint(3, cfg.vocab_size, size=(2, total))
    prompt_lens = np.array([4, 2])
    full = np.asarray(models.forward(model, jnp.asarray(seq), jnp.ones_like(jnp.asarray(seq))))

    # Prefill right-padded prompts into the cache, then one token per step.
    bucket = 4
    prompt = np.where(np.arange(bucket)[None] < prompt_lens[:, None], seq[:, :bucket], 0)
    pmask = (np.arange(bucket)[None] < prompt_lens[:, None]).astype(np.int32)
    cache = models.init_cache(cfg, batch_size=2, max_len=16)
    step = jax.jit(lambda p, ids, m, c: models.decoder_apply(p, cfg, ids, m, cache=c))
    hidden, cache = step(params, jnp.asarray(prompt), jnp.asarray(pmask), cache)
    logits = np.asarray(models.lm_logits(params, cfg, hidden))
    for b in range(2):
        np.testing.assert_allclose(logits[b, prompt_lens[b] - 1], full[b, prompt_lens[b] - 1],
                                   atol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), prompt_lens)
    pos = prompt_lens.copy()
    while pos.max() < total:
        tok = seq[np.arange(2), np.minimum(pos, total - 1)][:, None]
        active = (pos < total).astype(np.int32)[:, None]
        hidden, cache = step(params, jnp.asarray(tok), jnp.asarray(active), cache)
        logits = np.asarray(models.lm_logits(params, cfg, hidden))[:, 0]
        for b in range(2):
            if pos[b] < total:
                np.testing.assert_allclose(logits[b], full[b, pos[b]], atol=1e-4)
        pos = pos + active[:, 0]


def test_bf16_compute_stays_close_to_fp32(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    ids, mask = _batch(128)
    m32, _ = models.load_pretrained(path)
    model_bf16, cfg = models.load_pretrained(path, dtype="float32")
    cfg_bf16 = cfg.replace(dtype="bfloat16")
    ref = np.asarray(models.forward(m32, jnp.asarray(ids), jnp.asarray(mask)))
    h, _ = models.decoder_apply(model_bf16.params(), cfg_bf16, jnp.asarray(ids), jnp.asarray(mask))
    out = np.asarray(models.lm_logits(model_bf16.params(), cfg_bf16, h))
    assert out.dtype == np.float32
    real = mask.astype(bool)
    assert np.abs(out - ref)[real].max() < 0.05
    assert np.abs(out - ref)[real].max() > 0  # really computed in bf16
