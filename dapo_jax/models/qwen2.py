"""Qwen2 / Qwen2.5 decoder (and Llama-family: same layout without QKV bias) in Flax NNX.

The NNX module is a thin container of `nnx.Param`s with layers stacked on a leading axis; the math is
pure functions of a parameter dict (`decoder_apply`) so the same code serves training (scanned, remat),
full-sequence log-probs and KV-cache decoding. One weight layout: kernels [*in, *out], layers stacked.
The sampler may hold the weights differently for speed (`sampler.decode_layout`); it passes the
matching `matmul` to `decoder_apply`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from dapo_jax.models.attention import (dense_attention, dot_product_attention,
                                       paged_decode_attention, resolve_attention,
                                       resolve_paged_decode, segment_local_attention)
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.sharding import logical_to_spec, with_logical_constraint
from dapo_jax.models.swiglu import swiglu_mlp

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def jnp_dtype(name: str) -> Any:
    """Maps a dtype name from the config to a jnp dtype."""
    return _DTYPES[name]


def param_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names of every parameter, as a nested dict shaped like the params."""
    layers = {
        "input_norm": ("layers", "norm"),
        "q_kernel": ("layers", "embed", "q_heads", "head_dim"),
        "k_kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "v_kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "o_kernel": ("layers", "q_heads", "head_dim", "embed"),
        "post_norm": ("layers", "norm"),
        "gate_kernel": ("layers", "embed", "mlp"),
        "up_kernel": ("layers", "embed", "mlp"),
        "down_kernel": ("layers", "mlp", "embed"),
    }
    if cfg.attention_bias:
        layers.update(q_bias=("layers", "q_heads", "head_dim"), k_bias=("layers", "kv_heads", "head_dim"),
                      v_bias=("layers", "kv_heads", "head_dim"))
    axes: dict[str, Any] = {"embed": ("vocab", "embed"), "final_norm": ("norm",), "layers": layers}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


# Kernels are stored [*in, *out] (the training layout); the number of input dims of each.
KERNEL_INPUT_DIMS = {"q_kernel": 1, "k_kernel": 1, "v_kernel": 1, "o_kernel": 2,
                     "gate_kernel": 1, "up_kernel": 1, "down_kernel": 1}


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Shapes of every parameter, as a nested dict shaped like the params."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = {
        "input_norm": (L, D), "q_kernel": (L, D, H, hd), "k_kernel": (L, D, K, hd),
        "v_kernel": (L, D, K, hd), "o_kernel": (L, H, hd, D), "post_norm": (L, D),
        "gate_kernel": (L, D, F), "up_kernel": (L, D, F), "down_kernel": (L, F, D),
    }
    if cfg.attention_bias:
        layers.update(q_bias=(L, H, hd), k_bias=(L, K, hd), v_bias=(L, K, hd))
    shapes: dict[str, Any] = {"embed": (cfg.vocab_size, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, cfg.vocab_size)
    return shapes


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading `layers` axis (scan-friendly)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp_dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        for name, shape in param_shapes(cfg)["layers"].items():
            if name.endswith("norm"):
                value = jnp.ones(shape, pdt)
            elif name.endswith("bias"):
                value = jnp.zeros(shape, pdt)
            else:
                value = init(rngs.params(), shape, pdt)
            setattr(self, name, nnx.Param(value))


class Qwen2(nnx.Module):
    """Qwen2/Qwen2.5 causal LM (Llama-family when `attention_bias=False`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = jnp_dtype(config.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        shapes = param_shapes(config)
        self.embed = nnx.Param(init(rngs.params(), shapes["embed"], pdt))
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones(shapes["final_norm"], pdt))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), shapes["lm_head"], pdt))

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the functional core's input)."""
        return nnx.state(self, nnx.Param).to_pure_dict()

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Full-sequence logits [B, T, V] (float32)."""
        hidden, _ = decoder_apply(self.params(), self.config, input_ids, attention_mask, positions)
        return lm_logits(self.params(), self.config, hidden)


# ----------------------------------------------------------------------------------------------
# Functional core.


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back before the weight multiply (as HF does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (HF's rotate-half convention) for x [B, T, H, hd] at positions [B, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Token positions that skip padding (left or right): cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense grouped-query attention. q [B,T,H,hd], k/v [B,S,K,hd], mask [B,T,S] bool -> [B,T,H,hd].

    Materialises the scores: used for single-token decode (O(S) anyway) and as the reference.
    """
    return dense_attention(q, k, v, mask)


def segment_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Segment ids of unpacked rows: 1 for real tokens, 0 for padding."""
    return (attention_mask != 0).astype(jnp.int32)


def _attention_fn(cfg: ModelConfig, mesh: Mesh | None, rules, **mask_args) -> Callable:
    """`attend(q, k, v)` with the configured implementation; the Pallas kernels run per shard."""
    impl = resolve_attention(cfg.attention)
    fn = functools.partial(dot_product_attention, implementation=impl, **mask_args)
    self_attention = "q_positions" not in mask_args
    if impl in ("dense", "blockwise") or not self_attention or mesh is None or mesh.size == 1:
        return lambda q, k, v: fn(q, k, v)
    # Pallas kernels are opaque to the SPMD partitioner: run them on each device's shard (rows over
    # the batch axes, heads over the tensor axis when both query and KV heads divide it).
    seg = mask_args["q_segment_ids"]

    def attend(q, k, v):
        batch = logical_to_spec(("batch",), (q.shape[0],), mesh, rules)[0]
        # Query heads are grouped per KV head, so splitting both by the same axis keeps groups whole.
        heads = logical_to_spec((None, "act_heads"), (1, k.shape[2]), mesh, rules)[1]
        qkv = PartitionSpec(batch, None, heads, None)
        ids = PartitionSpec(batch, None)
        return jax.shard_map(lambda q, k, v, s: dot_product_attention(
            q, k, v, q_segment_ids=s, kv_segment_ids=s, implementation=impl),
            mesh=mesh, in_specs=(qkv, qkv, qkv, ids), out_specs=qkv, check_vma=False)(q, k, v, seg)

    return attend


def project(x: jax.Array, w: jax.Array, n_in: int, *, preferred_element_type: Any = None
            ) -> jax.Array:
    """x [..., *in] times a kernel [*in, *out] (its first `n_in` dims are inputs) -> [..., *out]."""
    return jax.lax.dot_general(
        x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        preferred_element_type=preferred_element_type)


# `matmul(x, kernel, n_in)` as `project` computes it: what `decoder_apply` multiplies kernels with.
Matmul = Callable[[jax.Array, jax.Array, int], jax.Array]


def _layer(cfg: ModelConfig, mesh: Mesh | None, rules, h: jax.Array, lp: Params,
           positions: jax.Array, attend, kv_for_attention, matmul: Matmul = project):
    """One decoder layer. `kv_for_attention(k, v)` returns the keys/values to attend over and
    `attend(q, k, v)` the attention output."""
    dt = jnp_dtype(cfg.dtype)
    proj = lambda x, name: matmul(x, lp[name].astype(dt), KERNEL_INPUT_DIMS[name])  # noqa: E731
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = proj(x, "q_kernel"), proj(x, "k_kernel"), proj(x, "v_kernel")
    if cfg.attention_bias:
        q = q + lp["q_bias"].astype(dt)
        k = k + lp["k_bias"].astype(dt)
        v = v + lp["v_bias"].astype(dt)
    q = with_logical_constraint(q, ("batch", "seq", "act_heads", None), mesh, rules)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    k_all, v_all, aux = kv_for_attention(k, v)
    o = attend(q, k_all, v_all)
    h = h + proj(o, "o_kernel")
    x = rms_norm(h, lp["post_norm"], cfg.rms_norm_eps)
    constrain = functools.partial(with_logical_constraint, logical=("batch", "seq", "mlp"),
                                  mesh=mesh, rules=rules)
    if matmul is project:  # the training layout: the MLP with a transpose-free backward pass
        h = h + swiglu_mlp(x, lp["gate_kernel"].astype(dt), lp["up_kernel"].astype(dt),
                           lp["down_kernel"].astype(dt), constrain)
    else:
        h = h + proj(constrain(jax.nn.silu(proj(x, "gate_kernel")) * proj(x, "up_kernel")),
                     "down_kernel")
    h = with_logical_constraint(h, ("batch", "act_seq", "act_embed"), mesh, rules)
    return h, aux


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def decoder_apply(params: Params, cfg: ModelConfig, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                  *, cache: Mapping[str, jax.Array] | None = None, mesh: Mesh | None = None,
                  rules: Mapping[str, Any] | None = None, matmul: Matmul = project,
                  segment_ids: jax.Array | None = None, return_kv: bool = False
                  ) -> tuple[jax.Array, dict | None]:
    """Runs embeddings + all layers + final norm. Returns (hidden [B,T,D], updated cache or None).

    Without `cache`: full causal self-attention; `attention_mask` [B,T] marks real tokens (padding on
    either side) and positions default to `positions_from_mask(attention_mask)`. `segment_ids` [B,T]
    (default `segment_ids_from_mask(attention_mask)`) packs several samples in one row: a token attends
    to earlier tokens of its own nonzero segment only (0 = padding); the caller passes positions that
    restart per sample. Attention runs with `cfg.attention` (`models.attention`): the blockwise and
    kernel implementations never hold a [T, T] score matrix. With `return_kv` (the sampler's packed
    prefill; forward only) the second output is every layer's keys and values, {"k", "v":
    [L,B,T,K,hd]}, and XLA attention (dense, blockwise) becomes `segment_local_attention`, which
    skips the key blocks outside each query block's samples.
    With `cache` ({"k","v": [L,B,K,S,hd], "lengths": [B]}): the T new tokens of each row are written at
    cache positions lengths[b] .. lengths[b]+T-1 and attend causally to everything before them; rows must
    be right-padded (padding after the real tokens), and `lengths` advances by the real-token count.
    With a paged cache ({"kv": [L,N,P,K,2,hd], a pool of N pages of P tokens, keys at [..., 0, :] and
    values at [..., 1, :]; "page_table": [B,M]; "lengths": [B]}): one token per row (decode); row b's
    pages are page_table[b] in position order.
    `params["layers"]` holds the layers stacked on a leading axis, or is a sequence of per-layer dicts
    (the sampler's per-layer layout: each layer's arrays are read in place, no slice of a stack).
    `matmul(x, kernel, n_in)` multiplies activations by each layer kernel (default `project`, for
    kernels [*in, *out]); the sampler passes its layout's (`sampler.decode_layout`).
    """
    dt = jnp_dtype(cfg.dtype)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    attention_mask = attention_mask.astype(jnp.int32)
    h = jnp.take(params["embed"], input_ids, axis=0).astype(dt)
    h = with_logical_constraint(h, ("batch", "act_seq", "act_embed"), mesh, rules)
    layers = params["layers"]

    if cache is None:
        if positions is None:
            positions = positions_from_mask(attention_mask)
        if segment_ids is None:
            segment_ids = segment_ids_from_mask(attention_mask)
        segment_ids = segment_ids.astype(jnp.int32)
        attend = _attention_fn(cfg, mesh, rules, q_segment_ids=segment_ids,
                               kv_segment_ids=segment_ids)
        if return_kv and resolve_attention(cfg.attention) in ("dense", "blockwise"):
            # The packed prefill (forward only): skip the key blocks of other samples.
            attend = lambda q, k, v: segment_local_attention(q, k, v, segment_ids)  # noqa: E731

        keep = (lambda k, v: (k, v, (k, v))) if return_kv else (lambda k, v: (k, v, None))

        def body(h, lp):
            return _layer(cfg, mesh, rules, h, lp, positions, attend, keep, matmul)

        body = _remat(body, cfg.remat)
        if isinstance(layers, (list, tuple)):
            kvs = []
            for lp in layers:
                h, kv = body(h, lp)
                kvs.append(kv)
            kvs = jax.tree.map(lambda *x: jnp.stack(x), *kvs) if return_kv else None
        elif cfg.scan_layers:
            h, kvs = jax.lax.scan(body, h, layers)
        else:
            kvs = []
            for i in range(cfg.num_layers):
                h, kv = body(h, jax.tree.map(lambda x: x[i], layers))
                kvs.append(kv)
            kvs = jax.tree.map(lambda *x: jnp.stack(x), *kvs) if return_kv else None
        h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
        return h, ({"k": kvs[0], "v": kvs[1]} if return_kv else None)

    if "page_table" in cache:
        h, new_cache = _paged_decode(params, cfg, h, attention_mask, positions, cache, mesh, rules,
                                     matmul)
        return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), new_cache

    lengths = cache["lengths"].astype(jnp.int32)
    s = cache["k"].shape[3]
    offsets = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # cache slot of each new token
    if positions is None:
        positions = offsets
    if t == 1:  # decode: one query row, dense is O(S) already
        mask = jnp.arange(s, dtype=jnp.int32)[None, None, :] <= offsets[:, :, None]  # [B, 1, S]
        attend = lambda q, k, v: attention(q, k, v, mask)  # noqa: E731
    else:  # prefill: causal by cache slot, without a [T, S] mask or scores
        attend = _attention_fn(
            cfg, mesh, rules, q_segment_ids=jnp.ones((b, t), jnp.int32),
            kv_segment_ids=jnp.ones((b, s), jnp.int32), q_positions=offsets,
            kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]

    def body(carry, xs):
        h, ck, cv = carry
        lp, i = xs

        def kv_fn(k, v):
            # Scatter only the new tokens into the carried cache (updated in place inside the loop).
            # The cache is [L, B, K, S, hd], the operand layout of attention's batched dots, so
            # they read a layer's keys and values without a transposed copy.
            nk = ck.at[i, rows, :, offsets].set(k.astype(ck.dtype), mode="drop")
            nv = cv.at[i, rows, :, offsets].set(v.astype(cv.dtype), mode="drop")
            seq_major = lambda c: jnp.swapaxes(c[i], 1, 2).astype(dt)  # noqa: E731
            return seq_major(nk), seq_major(nv), (nk, nv)

        h, (ck, cv) = _layer(cfg, mesh, rules, h, lp, positions, attend, kv_fn, matmul)
        return (h, ck, cv), None

    idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    carry = (h, cache["k"], cache["v"])
    if isinstance(layers, (list, tuple)):
        for i, lp in enumerate(layers):
            carry, _ = body(carry, (lp, i))
    elif cfg.scan_layers:
        carry, _ = jax.lax.scan(body, carry, (layers, idx))
    else:
        for i in range(cfg.num_layers):
            carry, _ = body(carry, (jax.tree.map(lambda x: x[i], layers), i))
    h, ck, cv = carry
    new_cache = {"k": ck, "v": cv, "lengths": lengths + attention_mask.sum(axis=-1)}
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), new_cache


def paged_cache_specs(mesh: Mesh, rules: Mapping[str, Any] | None, slots: int, num_kv_heads: int
                      ) -> tuple[PartitionSpec, Any, Any]:
    """(pool spec [L, N, P, K, 2, hd], slot axes, KV-head axis) of a paged cache on `mesh`.

    The pages are split over the same mesh axes as the slots ("cache_batch"): slot block d owns
    page block d, so a decode step reads and writes only its own device's pages.
    """
    rows = logical_to_spec(("cache_batch",), (slots,), mesh, rules)[0]
    kv = logical_to_spec((None, "act_kv_heads"), (1, num_kv_heads), mesh, rules)[1]
    return PartitionSpec(None, rows, None, kv, None, None), rows, kv


def mesh_axes_size(mesh: Mesh, axes: Any) -> int:
    """Devices along `axes` (a mesh axis name, a tuple of them, or None)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in names]))


def _paged_write(ckv, k, v, table, lengths, live, i):
    """Writes each live row's new K/V [B,1,K,hd] at its length into its page (others dropped)."""
    n_pages, page = ckv.shape[1], ckv.shape[2]
    idx = jnp.take_along_axis(table, (lengths // page)[:, None], axis=1, mode="clip")[:, 0]
    dest = jnp.where(live, idx, n_pages)  # out of range: dropped
    new = jnp.stack([k[:, 0], v[:, 0]], axis=-2).astype(ckv.dtype)  # [B, K, 2, hd]
    return ckv.at[i, dest, lengths % page].set(new, mode="drop")


def _paged_decode(params: Params, cfg: ModelConfig, h: jax.Array, attention_mask: jax.Array,
                  positions: jax.Array | None, cache: Mapping[str, jax.Array], mesh: Mesh | None,
                  rules, matmul: Matmul) -> tuple[jax.Array, dict]:
    """`decoder_apply`'s layers for one new token per row over a paged cache (see `decoder_apply`).

    Rows whose mask is 0 neither write (their page index is out of range: the scatter drops it, so a
    finished slot never touches pages it gave back) nor attend, and their length does not advance.
    On a mesh that splits the slots, writes and attention run per device (`shard_map`) on its own
    slots and pages; the page table then holds each device's local page ids.
    """
    b, t = h.shape[:2]
    if t != 1:
        raise ValueError(f"a paged KV cache takes one token per row (decode), got {t}; prefill into "
                         "a dense cache and copy it into pages")
    dt = jnp_dtype(cfg.dtype)
    lengths = cache["lengths"].astype(jnp.int32)
    table = cache["page_table"].astype(jnp.int32)
    if positions is None:
        positions = lengths[:, None]
    live = attention_mask[:, 0] != 0
    kv_len = jnp.where(live, lengths + 1, 0)
    write = _paged_write
    impl = resolve_paged_decode(cfg.attention, cfg.head_dim)

    def attn(q, ckv, tb, n, i):
        return paged_decode_attention(q, ckv, tb, n, layer=i, implementation=impl)

    if mesh is not None and mesh.size > 1:
        pool_spec, rows, kv = paged_cache_specs(mesh, rules, b, cfg.num_kv_heads)
        if mesh_axes_size(mesh, rows) > 1:
            heads = PartitionSpec(rows, None, kv, None)  # [B, 1, heads, hd]; q's split like k's
            vec, tab, one = PartitionSpec(rows), PartitionSpec(rows, None), PartitionSpec()
            sm_write = jax.shard_map(_paged_write, mesh=mesh, check_vma=False,
                                     in_specs=(pool_spec, heads, heads, tab, vec, vec, one),
                                     out_specs=pool_spec)
            sm_attn = jax.shard_map(attn, mesh=mesh, check_vma=False,
                                    in_specs=(heads, pool_spec, tab, vec, one), out_specs=heads)
            # The layer index enters shard_map as an array (a Python int stays static elsewhere).
            write = lambda *a: sm_write(*a[:-1], jnp.asarray(a[-1], jnp.int32))  # noqa: E731
            attn = lambda *a: sm_attn(*a[:-1], jnp.asarray(a[-1], jnp.int32))  # noqa: E731

    def body(carry, xs):
        h, ckv = carry
        lp, i = xs

        def kv_fn(k, v):
            nkv = write(ckv, k, v, table, lengths, live, i)
            return nkv, None, nkv

        def attend(q, kv_pages, _):  # reads layer i's pages out of the stacked pool (no layer copy)
            return attn(q, kv_pages, table, kv_len, i).astype(dt)

        h, ckv = _layer(cfg, mesh, rules, h, lp, positions, attend, kv_fn, matmul)
        return (h, ckv), None

    layers = params["layers"]
    carry = (h, cache["kv"])
    if isinstance(layers, (list, tuple)):
        for i, lp in enumerate(layers):
            carry, _ = body(carry, (lp, i))
    elif cfg.scan_layers:
        carry, _ = jax.lax.scan(body, carry, (layers, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    else:
        for i in range(cfg.num_layers):
            carry, _ = body(carry, (jax.tree.map(lambda x: x[i], layers), i))
    h, ckv = carry
    new_cache = dict(cache, kv=ckv, lengths=lengths + live.astype(jnp.int32))
    return h, new_cache


def lm_head_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def lm_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 logits for hidden states [..., D]."""
    w = lm_head_weight(params, cfg).astype(jnp_dtype(cfg.dtype))
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: str | None = None
               ) -> dict[str, jax.Array]:
    """An empty KV cache for `batch_size` rows of up to `max_len` tokens."""
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    dt = jnp_dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "lengths": jnp.zeros((batch_size,), jnp.int32)}
