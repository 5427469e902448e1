"""The sampler's decode layouts: out-major matmuls equal the plain product, conversions permute
params, shapes and logical axes alike, and KV-cache decoding from every layout reproduces the model's
full forward position by position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import models
from dapo_jax.models import qwen2
from dapo_jax.models.sharding import make_mesh
from dapo_jax.sampler import decode_layout
from dapo_jax.sampler.decode_layout import DECODE_LAYOUTS, DecodeLayout, resolve_decode_layout
from dapo_jax.sampler.engine import SAMPLING_RULES


def test_auto_is_per_layer_everywhere_and_out_major_on_cpu_only():
    assert resolve_decode_layout("auto", "cpu") == DecodeLayout(per_layer=True, out_major=True)
    for platform in ("gpu", "tpu"):
        assert resolve_decode_layout("auto", platform) == DecodeLayout(per_layer=True,
                                                                       out_major=False)
    for name, layout in DECODE_LAYOUTS.items():
        assert layout.name == name and resolve_decode_layout(name, "tpu") == layout
    with pytest.raises(ValueError, match="unknown decode layout 'fast'.*per_layer_out_major"):
        resolve_decode_layout("fast", "cpu")


def test_project_out_major_equals_the_plain_product():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(3, 5, 4, 6).astype(np.float32))  # [B, T, heads, head_dim]
    w = jnp.asarray(rng.randn(4, 6, 7).astype(np.float32))  # o_kernel-like: two input dims
    ref = np.einsum("bthk,hkd->btd", x, w)
    np.testing.assert_allclose(np.asarray(qwen2.project(x, w, 2)), ref, rtol=1e-5, atol=1e-5)
    wt = jnp.transpose(w, (2, 0, 1))
    out = jax.jit(lambda x, wt: decode_layout.project_out_major(x, wt, 2))(x, wt)
    assert out.shape == (3, 5, 7)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen2_mha_tied_odd_head"])
def test_transpose_kernels_permutes_params_shapes_and_axes_alike(hf_checkpoints, name):
    path, _ = hf_checkpoints[name]
    model, cfg = models.load_pretrained(path)
    params = decode_layout.transpose_kernels(model.params(), cfg)
    shapes = decode_layout.transpose_kernels(qwen2.param_shapes(cfg), cfg)
    axes = decode_layout.transpose_kernels(qwen2.param_logical_axes(cfg), cfg)
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
    per_layer = decode_layout.transpose_kernels(decode_layout.unstack_layers(model.params()), cfg)
    np.testing.assert_array_equal(np.asarray(per_layer["layers"][1]["gate_kernel"]),
                                  np.asarray(layers["gate_kernel"][1]))


@pytest.mark.parametrize("layout", list(DECODE_LAYOUTS))
def test_converted_params_match_the_layouts_shapes_and_shardings(hf_checkpoints, layout):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    model, cfg = models.load_pretrained(path)
    layout = DECODE_LAYOUTS[layout]
    params = layout.convert(model.params(), cfg)
    assert layout.holds(params, cfg)
    # In float32, "stacked" is the training layout itself; every other layout differs from it.
    assert layout.holds(model.params(), cfg) == (layout.name == "stacked")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = layout.shardings(cfg, mesh, SAMPLING_RULES)
    abstract = layout.abstract(cfg, shardings)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert (x.shape, x.dtype) == (a.shape, a.dtype)
        assert len(a.sharding.spec) <= x.ndim
    gate = (params["layers"][0] if layout.per_layer else params["layers"])["gate_kernel"]
    spec = (shardings["layers"][0] if layout.per_layer else shardings["layers"])["gate_kernel"].spec
    mlp_dim = gate.ndim - 2 if layout.out_major else gate.ndim - 1  # mlp is split over tensor
    assert spec[mlp_dim] == "tensor"


@pytest.mark.parametrize("name,layout", [("qwen2_gqa_untied", n) for n in DECODE_LAYOUTS]
                         + [("qwen2_mqa_tied", "per_layer_out_major")])
def test_kv_cache_decode_from_every_layout_reproduces_full_forward(hf_checkpoints, name, layout):
    """Prefill right-padded prompts, then one token per step, with the layout's params, matmul and
    logits: each position's logits equal the model's full forward (itself checked against HF)."""
    path, _ = hf_checkpoints[name]
    model, cfg = models.load_pretrained(path)
    layout = DECODE_LAYOUTS[layout]
    params = layout.convert(model.params(), cfg)
    rng = np.random.RandomState(1)
    total = 10
    seq = rng.randint(3, cfg.vocab_size, size=(2, total))
    prompt_lens = np.array([4, 2])
    full = np.asarray(models.forward(model, jnp.asarray(seq), jnp.ones_like(jnp.asarray(seq))))

    def logits_of(hidden):  # [B, D] -> [B, V], whichever axis the layout puts the vocabulary on
        logits, vocab_axis = layout.logits(params, cfg, hidden)
        return np.moveaxis(np.asarray(logits), vocab_axis, -1)

    bucket = 4
    prompt = np.where(np.arange(bucket)[None] < prompt_lens[:, None], seq[:, :bucket], 0)
    pmask = (np.arange(bucket)[None] < prompt_lens[:, None]).astype(np.int32)
    cache = models.init_cache(cfg, batch_size=2, max_len=16)
    step = jax.jit(lambda p, ids, m, c: models.decoder_apply(p, cfg, ids, m, cache=c,
                                                            matmul=layout.matmul))
    hidden, cache = step(params, jnp.asarray(prompt), jnp.asarray(pmask), cache)
    last = hidden[jnp.arange(2), jnp.asarray(prompt_lens - 1)]
    np.testing.assert_allclose(logits_of(last), full[np.arange(2), prompt_lens - 1], atol=1e-4)
    pos = prompt_lens.copy()
    while pos.max() < total:
        tok = seq[np.arange(2), np.minimum(pos, total - 1)][:, None]
        active = (pos < total).astype(np.int32)[:, None]
        hidden, cache = step(params, jnp.asarray(tok), jnp.asarray(active), cache)
        logits = logits_of(hidden[:, 0])
        for b in range(2):
            if pos[b] < total:
                np.testing.assert_allclose(logits[b], full[b, pos[b]], atol=1e-4)
        pos = pos + active[:, 0]
