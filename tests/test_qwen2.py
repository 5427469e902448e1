"""The NNX Qwen2/Llama decoder matches transformers' PyTorch models; padding and KV cache are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dapo_jax import models
from dapo_jax.models import qwen2
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


@pytest.mark.parametrize("name,out_major", [("qwen2_gqa_untied", False), ("llama_gqa_untied", False),
                                            ("qwen2_gqa_untied", True), ("qwen2_mqa_tied", True)])
def test_kv_cache_decode_reproduces_full_forward_position_by_position(hf_checkpoints, name,
                                                                       out_major):
    path, _ = hf_checkpoints[name]
    model, cfg = models.load_pretrained(path)
    params = model.params()
    if out_major:  # the sampler's layout: per-layer [out, in] kernels, W x^T matmuls
        params = qwen2.unstack_layers(qwen2.transpose_kernels(params, cfg))
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
    step = jax.jit(lambda p, ids, m, c: models.decoder_apply(p, cfg, ids, m, cache=c,
                                                            out_major=out_major))
    hidden, cache = step(params, jnp.asarray(prompt), jnp.asarray(pmask), cache)
    logits = np.asarray(models.lm_logits(params, cfg, hidden, out_major=out_major))
    for b in range(2):
        np.testing.assert_allclose(logits[b, prompt_lens[b] - 1], full[b, prompt_lens[b] - 1],
                                   atol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), prompt_lens)
    pos = prompt_lens.copy()
    while pos.max() < total:
        tok = seq[np.arange(2), np.minimum(pos, total - 1)][:, None]
        active = (pos < total).astype(np.int32)[:, None]
        hidden, cache = step(params, jnp.asarray(tok), jnp.asarray(active), cache)
        logits = np.asarray(models.lm_logits(params, cfg, hidden, out_major=out_major))[:, 0]
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


def test_project_out_major_equals_the_training_layout():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(3, 5, 4, 6).astype(np.float32))  # [B, T, heads, head_dim]
    w = jnp.asarray(rng.randn(4, 6, 7).astype(np.float32))  # o_kernel-like: two input dims
    ref = np.asarray(qwen2.project(x, w, 2))
    np.testing.assert_allclose(ref, np.einsum("bthk,hkd->btd", x, w), rtol=1e-5, atol=1e-5)
    wt = jnp.transpose(w, (2, 0, 1))
    out = jax.jit(lambda x, wt: qwen2.project(x, wt, 2, out_major=True))(x, wt)
    assert out.shape == (3, 5, 7)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen2_mha_tied_odd_head"])
def test_transpose_kernels_permutes_params_shapes_and_axes_alike(hf_checkpoints, name):
    path, _ = hf_checkpoints[name]
    model, cfg = models.load_pretrained(path)
    params = qwen2.transpose_kernels(model.params(), cfg)
    shapes = qwen2.transpose_kernels(qwen2.param_shapes(cfg), cfg)
    axes = qwen2.transpose_kernels(qwen2.param_logical_axes(cfg), cfg)
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    assert got == shapes
    jax.tree.map(lambda a, s: len(a) == len(s) or pytest.fail(f"{a} vs {s}"), axes, shapes,
                 is_leaf=is_tuple)
    layers = params["layers"]
    assert shapes["layers"]["q_kernel"][1:] == (cfg.num_heads, cfg.head_dim, cfg.hidden_size)
    assert axes["layers"]["o_kernel"] == ("layers", "embed", "q_heads", "head_dim")
    assert layers["down_kernel"].shape[1:] == (cfg.hidden_size, cfg.intermediate_size)
    if not cfg.tie_word_embeddings:
        assert params["lm_head"].shape == (cfg.vocab_size, cfg.hidden_size)
    # Per-layer tuples (after unstack_layers) transpose the same way, without a leading axis.
    per_layer = qwen2.transpose_kernels(qwen2.unstack_layers(model.params()), cfg)
    np.testing.assert_array_equal(np.asarray(per_layer["layers"][1]["gate_kernel"]),
                                  np.asarray(layers["gate_kernel"][1]))
