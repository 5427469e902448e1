"""Attention without a [T, S] score matrix (dapo_jax.models.attention) against the dense path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax import models
from dapo_jax.models import attention as attn
from dapo_jax.models.config import preset, to_hf_config

TOL = dict(rtol=1e-5, atol=1e-5)


def _segments(b, t):
    """Left padding, right padding and two packed samples in one row (0 = padding)."""
    seg = np.ones((b, t), np.int32)
    seg[0, :7] = 0
    seg[0, 120:] = 2
    seg[1, t - 20:] = 0
    seg[1, :3] = 0
    return jnp.asarray(seg)


def _qkv(b, t, s, h, kvh, hd, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, s, kvh, hd)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, s, kvh, hd)), jnp.float32))


def _value_and_grads(impl, q, k, v, **kw):
    def loss(q, k, v):
        o = attn.dot_product_attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(o * jnp.cos(o)), o

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def test_dense_matches_numpy_softmax_formula():
    q, k, v = _qkv(2, 40, 40, 4, 2, 8)
    seg = _segments(2, 40).at[0, 30:].set(2)
    out = np.asarray(attn.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                implementation="dense"))
    qn, kn, vn, sn = map(np.asarray, (q, k, v, seg))
    for b in range(2):
        for t in range(40):
            for hh in range(4):
                visible = [s for s in range(t + 1) if sn[b, s] == sn[b, t] != 0]
                if not visible:
                    np.testing.assert_array_equal(out[b, t, hh], 0.0)  # padding rows: zeros
                    continue
                logits = np.array([qn[b, t, hh] @ kn[b, s, hh // 2] for s in visible]) / np.sqrt(8)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                np.testing.assert_allclose(out[b, t, hh], p @ vn[b, visible, hh // 2], **TOL)


# T = 200 is no multiple of any block; GQA with 2 query heads per KV head; segments on both sides.
@pytest.mark.parametrize("impl,kw", [
    ("blockwise", dict(block_size=64)),
    ("splash", dict(interpret=True)),  # the TPU kernel, in Pallas interpret mode
    ("pallas_gpu", dict(interpret=True)),  # the GPU (Triton) kernel, in Pallas interpret mode
])
def test_implementation_matches_dense_outputs_and_gradients(impl, kw):
    q, k, v = _qkv(2, 200, 200, 4, 2, 16)
    seg = _segments(2, 200)
    ref_out, ref_grads = _value_and_grads("dense", q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    out, grads = _value_and_grads(impl, q, k, v, q_segment_ids=seg, kv_segment_ids=seg, **kw)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref_out, **TOL)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, **TOL)


def test_blockwise_into_a_cache_matches_dense():
    # Prefill of T new tokens at cache slots lengths[b] .. lengths[b]+T-1 of an S-slot cache.
    b, t, s = 2, 24, 70
    q, k, v = _qkv(b, t, s, 4, 1, 8, seed=1)
    offsets = jnp.asarray([[5], [33]], jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    kw = dict(q_segment_ids=jnp.ones((b, t), jnp.int32), kv_segment_ids=jnp.ones((b, s), jnp.int32),
              q_positions=offsets, kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)))
    ref_out, ref_grads = _value_and_grads("dense", q, k, v, **kw)
    out, grads = _value_and_grads("blockwise", q, k, v, block_size=16, **kw)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, **TOL)


def _init(cfg):
    return models.Qwen2(cfg, rngs=nnx.Rngs(0)).params()


def test_decoder_blockwise_matches_dense_logits_and_parameter_gradients():
    dense, blockwise = preset("tiny", attention="dense"), preset("tiny", attention="blockwise")
    params = _init(dense)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, dense.vocab_size, (2, 37)), jnp.int32)
    mask = np.ones((2, 37), np.int32)
    mask[0, :5] = 0  # left padding
    mask[1, 30:] = 0  # right padding
    mask = jnp.asarray(mask)

    def run(cfg):
        def loss(p):
            h, _ = models.decoder_apply(p, cfg, ids, mask)
            logits = models.lm_logits(p, cfg, h)
            lp = jax.nn.log_softmax(logits)
            return jnp.sum(jnp.take_along_axis(lp, ids[..., None], -1)[..., 0] * mask), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ref_logits), ref_grads = run(dense)
    (_, logits), grads = run(blockwise)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], **TOL)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, **TOL)


def test_packed_row_gives_the_logits_of_its_samples_run_separately():
    cfg = preset("tiny", attention="blockwise")
    params = _init(cfg)
    rng = np.random.default_rng(1)
    a = rng.integers(0, cfg.vocab_size, 13)
    b = rng.integers(0, cfg.vocab_size, 9)
    row = np.concatenate([a, b, np.zeros(4, np.int64)])[None]  # two samples + right padding
    segments = np.array([[1] * 13 + [2] * 9 + [0] * 4], np.int32)
    positions = np.array([list(range(13)) + list(range(9)) + [0] * 4], np.int32)
    h, _ = models.decoder_apply(params, cfg, jnp.asarray(row, jnp.int32),
                                jnp.asarray(segments != 0, jnp.int32), jnp.asarray(positions),
                                segment_ids=jnp.asarray(segments))
    packed = np.asarray(models.lm_logits(params, cfg, h))[0]
    for start, sample in ((0, a), (13, b)):
        h, _ = models.decoder_apply(params, preset("tiny", attention="dense"),
                                    jnp.asarray(sample[None], jnp.int32))
        alone = np.asarray(models.lm_logits(params, cfg, h))[0]
        np.testing.assert_allclose(packed[start:start + len(sample)], alone, **TOL)


def _temp_bytes(impl, t):
    b, h, kvh, hd = 1, 4, 2, 64
    q = jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, kvh, hd), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, s):
        o = attn.dot_product_attention(q, k, v, q_segment_ids=s, kv_segment_ids=s,
                                       implementation=impl, block_size=256)
        return jnp.sum(o * o)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return step.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_forward_and_backward_memory_grows_linearly_in_sequence_length():
    blockwise = _temp_bytes("blockwise", 2048) / _temp_bytes("blockwise", 1024)
    dense = _temp_bytes("dense", 2048) / _temp_bytes("dense", 1024)
    assert blockwise < 2.5, blockwise
    assert dense > 3.5, dense  # the [T, T] scores: quadratic


def test_attention_choice_is_validated_resolved_by_platform_and_not_exported():
    assert attn.resolve_attention("auto", "tpu") == "splash"
    assert attn.resolve_attention("auto", "gpu") == "pallas_gpu"
    assert attn.resolve_attention("auto", "cpu") == "blockwise"
    assert attn.resolve_attention("dense", "tpu") == "dense"
    with pytest.raises(ValueError, match="attention must be one of"):
        preset("tiny", attention="flash")
    assert "attention" not in to_hf_config(preset("tiny", attention="dense"))


def test_splash_kernel_runs_per_shard_on_a_mesh_and_matches_dense():
    # Pallas kernels are opaque to the SPMD partitioner: decoder_apply runs them under shard_map
    # (rows over fsdp, heads over tensor). On CPU the TPU kernel runs in interpret mode.
    mesh = models.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    dense, splash = preset("tiny", attention="dense"), preset("tiny", attention="splash")
    params = _init(dense)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, dense.vocab_size, (2, 37)), jnp.int32)
    mask = jnp.asarray(np.arange(37)[None] >= np.array([[4], [0]]), jnp.int32)  # one left-padded

    def logits(cfg, mesh):
        h, _ = models.decoder_apply(params, cfg, ids, mask, mesh=mesh)
        return models.lm_logits(params, cfg, h)

    ref = np.asarray(jax.jit(lambda: logits(dense, None))())
    out = np.asarray(jax.jit(lambda: logits(splash, mesh))())
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(out[real], ref[real], **TOL)


@pytest.mark.parametrize("block", [16, 64, 512])
def test_segment_local_attention_equals_dense_and_skips_other_samples(block):
    """The packed prefill's attention: equal to the masked dense path (padding, a one-token sample,
    several samples a row), and it never reads key blocks before its earliest sample's start:
    those keys and values are NaN here and the outputs stay exact."""
    b, t, h, kvh, hd = 2, 150, 4, 2, 8
    q, k, v = _qkv(b, t, t, h, kvh, hd, seed=3)
    seg = np.zeros((b, t), np.int32)
    seg[0, :40], seg[0, 40:41], seg[0, 41:130] = 1, 2, 3  # then padding
    seg[1, :] = 5
    seg = jnp.asarray(seg)
    want = attn.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                      implementation="dense")
    got = attn.segment_local_attention(q, k, v, seg, block=block)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(np.asarray(got)[0, 130:] == 0.0)  # padding rows
    if block == 16:  # row 0's third sample starts at 41: its query blocks from 48 on start at 32
        poisoned = [x[:1].at[0, :32].set(jnp.nan) for x in (k, v)]  # (rows share block ranges)
        got = attn.segment_local_attention(q[:1], *poisoned, seg[:1], block=block)
        np.testing.assert_allclose(np.asarray(got)[0, 48:], np.asarray(want)[0, 48:], **TOL)
