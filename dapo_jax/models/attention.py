"""Causal, segment-masked grouped-query attention without a [T, S] score matrix.

One entry point, `dot_product_attention`, with interchangeable implementations:

- "dense": materialises float32 scores [B, K, G, T, S]; the reference, O(T x S) memory.
- "blockwise": online softmax over key blocks (flash attention in plain JAX, `lax.scan`) with a
  flash-style custom VJP, so neither the forward nor the backward pass holds more than one
  [B, H, T, block] block of scores: O(T x block) memory. Portable; the CPU default.
- "splash": the TPU Pallas splash-attention kernel that ships with jax
  (`jax.experimental.pallas.ops.tpu.splash_attention`); the TPU default.
- "pallas_gpu": the Pallas (Triton) flash-attention kernel that ships with jax
  (`jax.experimental.pallas.ops.gpu.attention.mha`); the GPU default. It takes segment ids, which
  `jax.nn.dot_product_attention(implementation="cudnn")` cannot express (its `query_seq_lengths`
  assume right padding, and a boolean `mask` is itself O(T x S)), so cuDNN is not offered.

Masking semantics, shared by all: query t attends to key s iff `kv_pos[s] <= q_pos[t]` (causal) and
`q_segment_ids[t] == kv_segment_ids[s] != 0`. Segment 0 is padding; padding query rows output zeros
(finite, never NaN, and zero gradient). Positions here are *causal indices* (where a token sits in the
row or the KV cache), not the rotary positions, which restart per sample in packed rows.

The kernels ("splash", "pallas_gpu") assume self-attention over one row (key index = query index);
calls with explicit positions (the KV-cache prefill) use "blockwise" instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dense", "blockwise", "splash", "pallas_gpu")
CHOICES = ("auto",) + IMPLEMENTATIONS
_AUTO = {"tpu": "splash", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}
_GPU_NAMES = frozenset({"gpu", "cuda", "rocm"})
_MASK_VALUE = -1e30  # finite: a fully masked row never produces inf - inf = NaN
DEFAULT_BLOCK = 512


def target_platform() -> str:
    """The platform programs are traced for: the abstract device of jax's context mesh when one is
    set (`jax.sharding.use_abstract_mesh` with an `AbstractDevice`, as for lowering TPU or GPU
    programs on a CPU), else jax's default backend. Kernel choices and Pallas interpret mode follow
    it, so a CPU can lower exactly the program a TPU or GPU would run."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return platform.lower()


def resolve_attention(name: str, platform: str | None = None) -> str:
    """The implementation `name` selects on `platform` (default: `target_platform()`).

    "auto" is "splash" on TPU, "pallas_gpu" on GPU and "blockwise" elsewhere (CPU).
    """
    if name not in CHOICES:
        raise ValueError(f"model.attention must be one of {CHOICES}, got {name!r}")
    if name != "auto":
        return name
    platform = (platform or target_platform()).lower()
    return _AUTO.get(platform, "blockwise")


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array) -> jax.Array:
    """Boolean [B, T, S]: causal by index and same nonzero segment."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (q_segment_ids != 0)[:, :, None]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same & real & causal


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                          q_positions: jax.Array | None = None,
                          kv_positions: jax.Array | None = None,
                          implementation: str = "blockwise", block_size: int = DEFAULT_BLOCK,
                          interpret: bool | None = None) -> jax.Array:
    """Grouped-query attention. q [B,T,H,hd], k/v [B,S,K,hd] (H a multiple of K) -> [B,T,H,hd].

    `q_segment_ids` [B,T] / `kv_segment_ids` [B,S] (int, 0 = padding); `q_positions` [B,T] and
    `kv_positions` [B,S] are causal indices (default: 0..T-1 and 0..S-1, i.e. self-attention).
    `implementation` is one of `IMPLEMENTATIONS` (resolve "auto" with `resolve_attention` first);
    `interpret` runs the Pallas kernels in interpret mode; by default they do when
    `target_platform()` is not the kernel's platform (a forced "splash" on CPU runs, slowly, for
    tests).
    """
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kvh})")
    self_attention = q_positions is None and kv_positions is None
    if self_attention and t != s:
        raise ValueError(f"self-attention needs as many queries as keys ({t} vs {s}); pass "
                         "q_positions/kv_positions for attention into a KV cache")
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    q_positions = q_positions.astype(jnp.int32)
    kv_positions = kv_positions.astype(jnp.int32)
    if implementation in ("splash", "pallas_gpu") and not self_attention:
        implementation = "blockwise"
    if implementation == "dense":
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
        return dense_attention(q, k, v, mask)
    if implementation == "blockwise":
        return _blockwise(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                          min(block_size, s))
    if implementation == "splash":
        interpret = target_platform() != "tpu" if interpret is None else interpret
        return _splash(q, k, v, q_segment_ids, interpret=interpret)
    if implementation == "pallas_gpu":
        interpret = target_platform() not in _GPU_NAMES if interpret is None else interpret
        return _pallas_gpu(q, k, v, q_segment_ids, interpret=interpret)
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                     f"{IMPLEMENTATIONS}")


# ----------------------------------------------------------------------------------------------
# Dense reference.


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array):
    """q [B,T,H,hd] -> [B,K,G*T,hd]; k, v [B,S,K,hd] -> [B,K,S,hd].

    The G query heads that share a key/value head become G x T query rows, so every score and
    value product is a plain batched matmul over (B, K) and every mask is [B, 1, G*T, S]. Both
    matter on CPU: per-product transposes, and masks broadcast over a middle G axis, made the
    backward pass 2-3x slower (docs/benchmarks.md, the `dapo_step` profile)."""
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    qh = jnp.transpose(q.reshape(b, t, kvh, h // kvh, hd), (0, 2, 3, 1, 4))
    return qh.reshape(b, kvh, h // kvh * t, hd), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _query_rows(x: jax.Array, groups: int) -> jax.Array:
    """Per-query ids [B,T] repeated for the G heads of a group: [B, G*T] (as `_heads_major`)."""
    return jnp.tile(x, (1, groups))


def _tokens_major(x: jax.Array, groups: int) -> jax.Array:
    """[B,K,G*T,hd] -> [B,T,K*G,hd]."""
    b, kvh, gt, hd = x.shape
    x = x.reshape(b, kvh, groups, gt // groups, hd)
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, gt // groups, kvh * groups, hd)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Materialised-scores GQA. q [B,T,H,hd], k/v [B,S,K,hd], mask [B,T,S] bool -> [B,T,H,hd].

    Query rows with no visible key output zeros.
    """
    hd, g = q.shape[-1], q.shape[2] // k.shape[2]
    qh, kh, vh = _heads_major(q, k, v)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    m = jnp.tile(mask, (1, g, 1))[:, None]
    scores = jnp.where(m, scores, _MASK_VALUE)
    probs = jnp.where(m, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    return _tokens_major(jnp.einsum("bkqs,bksd->bkqd", probs, vh), g)


# ----------------------------------------------------------------------------------------------
# Blockwise online softmax (flash attention in plain JAX).


def _pad_keys(kh, vh, kv_seg, kv_pos, block):
    """Heads-major keys/values [B,K,S,hd] and their ids [B,S] as n blocks of `block` keys:
    [n,B,K,block,hd] and [n,B,block]."""
    s = kh.shape[2]
    n = -(-s // block)
    pad = n * block - s
    if pad:
        kh = jnp.pad(kh, ((0, 0), (0, 0), (0, pad), (0, 0)))
        vh = jnp.pad(vh, ((0, 0), (0, 0), (0, pad), (0, 0)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))  # segment 0: never attended to
        kv_pos = jnp.pad(kv_pos, ((0, 0), (0, pad)))

    def kv_blocks(x):  # [B, K, n*block, hd] -> [n, B, K, block, hd]
        return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1], n, block, x.shape[3]), 2, 0)

    def id_blocks(x):  # [B, n*block] -> [n, B, block]
        return jnp.moveaxis(x.reshape(x.shape[0], n, block), 1, 0)

    return kv_blocks(kh), kv_blocks(vh), id_blocks(kv_seg), id_blocks(kv_pos), pad


def _block_scores(qh, kb, q_seg, q_pos, seg_b, pos_b, scale):
    """Scaled scores [B,K,Q,blk] of query rows qh [B,K,Q,hd] (ids q_seg/q_pos [B,Q]) against one
    key block [B,K,blk,hd], and the mask [B,1,Q,blk]."""
    s = jnp.einsum("bkqd,bksd->bkqs", qh, kb, preferred_element_type=jnp.float32) * scale
    mask = ((q_seg[:, :, None] == seg_b[:, None, :]) & (q_seg != 0)[:, :, None]
            & (pos_b[:, None, :] <= q_pos[:, :, None]))[:, None]
    return jnp.where(mask, s, _MASK_VALUE), mask


def _blockwise_fwd_impl(qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, block):
    """Online softmax over query rows qh [B,K,Q,hd]: (out [B,K,Q,hd] in q's dtype, lse [B,K,Q])."""
    b, kvh, t, hd = qh.shape
    scale = hd ** -0.5
    kb, vb, segb, posb, _ = _pad_keys(kh, vh, kv_seg, kv_pos, block)

    def step(carry, xs):
        m, l, acc = carry  # [B,K,Q], [B,K,Q], [B,K,Q,hd] float32
        kj, vj, segj, posj = xs
        s, mask = _block_scores(qh, kj, q_seg, q_pos, segj, posj, scale)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(axis=-1)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(vh.dtype), vj,
                        preferred_element_type=jnp.float32)
        return (m_new, l, acc * corr[..., None] + pv), None

    init = (jnp.full((b, kvh, t), _MASK_VALUE, jnp.float32), jnp.zeros((b, kvh, t), jnp.float32),
            jnp.zeros((b, kvh, t, hd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, segb, posb))
    empty = l == 0.0  # padding queries: no visible key
    safe_l = jnp.where(empty, 1.0, l)
    out = jnp.where(empty[..., None], 0.0, acc / safe_l[..., None])
    lse = jnp.where(empty, jnp.inf, m + jnp.log(safe_l))  # exp(s - inf) = 0 in the backward pass
    return out.astype(qh.dtype), lse


def _blockwise(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block):
    g = q.shape[2] // k.shape[2]
    qh, kh, vh = _heads_major(q, k, v)
    out = _blockwise_heads(qh, kh, vh, _query_rows(q_seg, g), kv_seg, _query_rows(q_pos, g),
                           kv_pos, block)
    return _tokens_major(out, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blockwise_heads(qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, block):
    return _blockwise_fwd_impl(qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, block)[0]


def _blockwise_fwd(qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, block):
    out, lse = _blockwise_fwd_impl(qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, block)
    return out, (qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _blockwise_bwd(block, res, d_out):
    """Flash-attention backward: recompute each key block's probabilities from the saved
    log-sum-exp; dq accumulates over blocks, dk/dv are produced block by block."""
    qh, kh, vh, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
    b, kvh, t, hd = qh.shape
    s_len = kh.shape[2]
    scale = hd ** -0.5
    # D_t = sum_d dO * O  (the softmax Jacobian's row term), float32 [B,K,Q].
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    kb, vb, segb, posb, _ = _pad_keys(kh, vh, kv_seg, kv_pos, block)

    def step(dq, xs):
        kj, vj, segj, posj = xs
        s, mask = _block_scores(qh, kj, q_seg, q_pos, segj, posj, scale)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)  # [B,K,Q,blk]
        dv = jnp.einsum("bkqs,bkqd->bksd", p.astype(d_out.dtype), d_out,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkqd,bksd->bkqs", d_out, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkqs,bksd->bkqd", ds.astype(kh.dtype), kj,
                             preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkqs,bkqd->bksd", ds.astype(qh.dtype), qh,
                        preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros((b, kvh, t, hd), jnp.float32),
                                (kb, vb, segb, posb))

    def unblock(x):  # [n, B, K, block, hd] -> [B, K, S, hd]
        return jnp.moveaxis(x, 0, 2).reshape(b, kvh, -1, hd)[:, :, :s_len]

    return (dq.astype(qh.dtype), unblock(dk).astype(kh.dtype), unblock(dv).astype(vh.dtype),
            None, None, None, None)


_blockwise_heads.defvjp(_blockwise_fwd, _blockwise_bwd)


# ----------------------------------------------------------------------------------------------
# Pallas kernels (self-attention over one row: key index = query index).


def _pad_seq(x: jax.Array, multiple: int, axis: int = 1) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _zero_padding_rows(out: jax.Array, seg: jax.Array) -> jax.Array:
    return jnp.where((seg != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, groups: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq)) for _ in range(groups)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          use_fused_bwd_kernel=True)
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, seg, *, interpret: bool):
    """TPU splash attention: one MQA kernel per (row, KV head) over its G query heads."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    t_pad = t + (-t % 128)  # the kernel tiles by multiples of 128
    block = next(bs for bs in (512, 256, 128) if t_pad % bs == 0)
    kernel = _splash_kernel(t_pad, g, block, interpret)
    qs = _pad_seq(q * jnp.asarray(hd ** -0.5, q.dtype), 128)  # the kernel does not scale
    ks, vs, segp = _pad_seq(k, 128), _pad_seq(v, 128), _pad_seq(seg, 128)
    # [B, K, G, T, hd] and [B, K, S, hd]; padding (segment 0) only sees padding: no empty rows.
    qs = jnp.transpose(qs.reshape(b, t_pad, kvh, g, hd), (0, 2, 3, 1, 4))
    ks, vs = jnp.transpose(ks, (0, 2, 1, 3)), jnp.transpose(vs, (0, 2, 1, 3))

    def one_row(qr, kr, vr, sr):
        ids = sa.SegmentIds(q=sr, kv=sr)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qs, ks, vs, segp)  # [B, K, G, T, hd]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t_pad, h, hd)[:, :t]
    return _zero_padding_rows(out, seg)


def _pallas_gpu(q, k, v, seg, *, interpret: bool):
    """Pallas/Triton flash attention (causal + segment ids); KV heads repeated to the query heads."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, h, hd = q.shape
    g = h // k.shape[2]
    block = 64 if t <= 64 else 128
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    qp, kp, vp, segp = (_pad_seq(x, block) for x in (q, k, v, seg))
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=32,
                                     block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    out = gpu_attention.mha(qp, kp, vp, segp, sm_scale=hd ** -0.5, causal=True,
                            block_sizes=sizes, interpret=interpret)[:, :t]
    return _zero_padding_rows(out, seg)


# ----------------------------------------------------------------------------------------------
# Packed prefill: forward-only self-attention that visits only the key blocks a query block's
# segments reach.

PACKED_PREFILL_BLOCK = 128


def segment_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                            block: int = PACKED_PREFILL_BLOCK) -> jax.Array:
    """Causal self-attention within segments of packed rows, forward only, no [T, T] work.

    q [B,T,H,hd], k/v [B,T,K,hd], segment_ids [B,T] (0 = padding; a segment is a run of equal
    ids). Query block i attends only to key blocks from the one holding the start of its earliest
    segment up to block i, so a row of many short samples costs about T x (sample length + block)
    score entries instead of T x T (the blockwise and kernel implementations mask the other
    blocks but still compute them). Equal to `dot_product_attention` with these segment ids.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    n = -(-t // block)
    pad = n * block - t
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    idx = jnp.arange(n * block, dtype=jnp.int32)
    # Where each token's segment starts: the last index at or before it where the id changed.
    changed = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    starts = jax.lax.cummax(jnp.where(changed, idx[None], 0), axis=1)
    first_block = starts.reshape(b, n, block).min(axis=(0, 2)) // block  # [n]
    qb = q.reshape(b, n, block, kvh, g, hd).transpose(1, 0, 3, 4, 2, 5)  # [n, B, K, G, blk, hd]
    kb = k.reshape(b, n, block, kvh, hd).transpose(1, 0, 3, 2, 4)  # [n, B, K, blk, hd]
    vb = v.reshape(b, n, block, kvh, hd).transpose(1, 0, 3, 2, 4)
    segb = seg.reshape(b, n, block).transpose(1, 0, 2)  # [n, B, blk]
    idxb = idx.reshape(n, block)
    scale = hd ** -0.5

    def query_block(i):
        qi, seg_q, idx_q = qb[i], segb[i], idxb[i]

        def key_block(j, carry):
            m, l, acc = carry
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kb[j],
                           preferred_element_type=jnp.float32) * scale
            mask = ((seg_q[:, :, None] == segb[j][:, None, :]) & (seg_q != 0)[:, :, None]
                    & (idxb[j][None, None, :] <= idx_q[None, :, None]))[:, None, None]
            s = jnp.where(mask, s, _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j],
                            preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv

        init = (jnp.full((b, kvh, g, block), _MASK_VALUE, jnp.float32),
                jnp.zeros((b, kvh, g, block), jnp.float32),
                jnp.zeros((b, kvh, g, block, hd), jnp.float32))
        _, l, acc = jax.lax.fori_loop(first_block[i], i + 1, key_block, init)
        return jnp.where((l == 0.0)[..., None], 0.0, acc / jnp.where(l == 0.0, 1.0, l)[..., None])

    out = jax.lax.map(query_block, jnp.arange(n))  # [n, B, K, G, blk, hd]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * block, h, hd)
    return out[:, :t].astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Paged decode attention (one query per row over a paged KV cache).
#
# The pool's layout, [N, P, K, 2, hd] per layer (stacked: [L, N, P, K, 2, hd]), keeps a KV head's key
# and value rows side by side: reshaped (for free) to [N, P, 2K, hd] it is the K/V-interleaved page
# layout of jax's TPU ragged paged attention kernel, and stacked layers are [L*N, P, 2K, hd] pages
# whose indices are offset by layer*N, so the kernel reads a layer's pages without copying it out.

PAGED_BLOCK_TOKENS = 256  # keys per loop iteration: few iterations, little work past the lengths
PAGED_IMPLEMENTATIONS = ("xla", "ragged_tpu")


def resolve_paged_decode(attention: str, head_dim: int, platform: str | None = None) -> str:
    """The paged-decode attention for a model whose `model.attention` is `attention`.

    "ragged_tpu" (the TPU ragged paged attention kernel) where training attention resolves to the
    TPU kernel ("splash") on a TPU and the head dim is a multiple of 128 (the kernel's lane width;
    Qwen2.5-0.5B's 64 is not); "xla" (`paged_decode_attention`'s page loop) everywhere else.
    """
    platform = (platform or target_platform()).lower()
    if platform == "tpu" and resolve_attention(attention, platform) == "splash" \
            and head_dim % 128 == 0:
        return "ragged_tpu"
    return "xla"


def _layer_pages(kv_pages: jax.Array, layer: jax.Array | int | None, ids: jax.Array,
                 part: int) -> jax.Array:
    """Keys (`part` 0) or values (1) of pages `ids` of one layer, [B, n, P, K, hd], gathered
    straight out of a (stacked, when `layer` is given) pool: one gather each, no K/V-pair copy."""
    return kv_pages[ids, :, :, part] if layer is None else kv_pages[layer, ids, :, :, part]


def paged_decode_attention(q: jax.Array, kv_pages: jax.Array, page_table: jax.Array,
                           kv_lengths: jax.Array, *, layer: jax.Array | int | None = None,
                           block_tokens: int = PAGED_BLOCK_TOKENS,
                           implementation: str = "xla", kernel=None) -> jax.Array:
    """GQA of one query per row over its first `kv_lengths[b]` keys, stored in pages.

    q [B,1,H,hd]; kv_pages [N,P,K,2,hd] (one layer's pool; [..., 0, :] keys, [..., 1, :] values),
    or [L,N,P,K,2,hd] with `layer` the layer to read (gathered from the stacked pool directly:
    slicing a layer out first copies it); page_table [B, M] int32 (row b's page for positions j*P ..
    (j+1)*P-1; entries past the row's length may be anything); kv_lengths [B] (0 for a row that
    attends to nothing: it outputs zeros).

    "xla": an online softmax over blocks of pages, each row over its own blocks only: a loop takes
    B (row, block) pairs at a time until every row's blocks are done, so a step costs the sum of
    the rows' lengths (rounded up to blocks), not B x the longest row or the table's width. The
    block is the smallest power-of-two number of pages that holds the longest row, at most
    `block_tokens` keys; when one block holds every row, there is no loop.
    "ragged_tpu": jax's TPU ragged paged attention kernel (`kernel` replaces it, e.g. by its jnp
    reference in tests), which reads each row's pages up to its own length.
    """
    if q.shape[1] != 1:
        raise ValueError(f"paged_decode_attention takes one query per row, got {q.shape[1]}")
    if implementation == "ragged_tpu":
        return _ragged_tpu_decode(q, kv_pages, page_table, kv_lengths, layer, kernel)
    if implementation != "xla":
        raise ValueError(f"paged decode implementation must be one of {PAGED_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    b, _, h, hd = q.shape
    n_pages, page, kvh = kv_pages.shape[-5:-2]
    g = h // kvh
    max_pages = page_table.shape[1]
    kv_lengths = kv_lengths.astype(jnp.int32)
    qg = q.reshape(b, kvh, g, hd)
    longest = jnp.max(kv_lengths)

    def attend(q_rows, ids, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One block of pages per row: its max score, softmax mass and weighted values."""
        per_block = ids.shape[1]
        kb, vb = _layer_pages(kv_pages, layer, ids, 0), _layer_pages(kv_pages, layer, ids, 1)
        s = jnp.einsum("wkgd,wnpkd->wkgnp", q_rows, kb, preferred_element_type=jnp.float32)
        s = jnp.where(mask, s.reshape(b, kvh, g, per_block * page) * (hd ** -0.5), _MASK_VALUE)
        m = s.max(axis=-1)  # [W,K,G]
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        pv = jnp.einsum("wkgnp,wnpkd->wkgd",
                        p.reshape(b, kvh, g, per_block, page).astype(kv_pages.dtype), vb,
                        preferred_element_type=jnp.float32)
        return m, p.sum(axis=-1), pv

    def one_block(per_block: int) -> tuple[jax.Array, jax.Array]:
        # Every live row fits in its first `per_block` pages: one block each, no loop.
        ids = jnp.clip(page_table[:, :per_block].astype(jnp.int32), 0, n_pages - 1)
        span = jnp.arange(per_block * page, dtype=jnp.int32)
        _, l, acc = attend(qg, ids, (span[None] < kv_lengths[:, None])[:, None, None])
        return l, acc

    def loop(per_block: int) -> tuple[jax.Array, jax.Array]:
        n_static = -(-max_pages // per_block)
        table = jnp.pad(page_table.astype(jnp.int32),
                        ((0, 0), (0, n_static * per_block - max_pages)))
        table = table.reshape(b, n_static, per_block)
        span = per_block * page
        # Work items are (row, block) pairs, each row's own blocks only; every iteration takes
        # the next `b` of them (any rows), so a step costs the sum of the rows' blocks, not
        # b x the longest row's: a long-tailed batch reads what it holds.
        row_blocks = (kv_lengths + span - 1) // span  # [B], 0 for a free slot
        ends = jnp.cumsum(row_blocks)
        total = ends[-1]
        starts = ends - row_blocks

        def body(c, carry):
            m, l, acc = carry  # [B,K,G], [B,K,G], [B,K,G,hd] float32
            item = c * b + jnp.arange(b, dtype=jnp.int32)
            valid = item < total
            row = jnp.minimum(jnp.searchsorted(ends, item, side="right"), b - 1).astype(jnp.int32)
            blk = jnp.where(valid, item - starts[row], 0)
            ids = jnp.clip(table[row, blk], 0, n_pages - 1)  # [W, per_block]
            mask = (blk[:, None] * span + jnp.arange(span, dtype=jnp.int32)[None]
                    < kv_lengths[row][:, None]) & valid[:, None]
            m_item, l_item, pv = attend(qg[row], ids, mask[:, None, None])
            # Merge the items into their rows' running softmax (a row may have several items).
            m_item = jnp.where(valid[:, None, None], m_item, _MASK_VALUE)
            m_new = jnp.maximum(m, jnp.full_like(m, _MASK_VALUE).at[row].max(m_item))
            corr = jnp.exp(m - m_new)
            w = jnp.where(valid[:, None, None], jnp.exp(m_item - m_new[row]), 0.0)
            l = l * corr + jnp.zeros_like(l).at[row].add(l_item * w)
            acc = acc * corr[..., None] + jnp.zeros_like(acc).at[row].add(pv * w[..., None])
            return m_new, l, acc

        init = (jnp.full((b, kvh, g), _MASK_VALUE, jnp.float32),
                jnp.zeros((b, kvh, g), jnp.float32), jnp.zeros((b, kvh, g, hd), jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, (total + b - 1) // b, body, init)  # dynamic: a while loop
        return l, acc

    # Blocks of 1, 2, 4, ... pages up to block_tokens: the smallest block that holds the longest
    # row, or the largest one, looped. Short rows (early decode steps, short prompts) then read
    # their pages, not a whole block_tokens-key block each.
    largest = max(1, min(block_tokens // page, max_pages))
    sizes = sorted({min(1 << i, largest) for i in range(largest.bit_length() + 1)})
    branch = jnp.sum(jnp.asarray([n * page for n in sizes[:-1]], jnp.int32) < longest)
    # Only the largest block may need several per row (the work-item loop); smaller ones are
    # chosen when the longest row fits one, as is the largest when it spans the whole table.
    branches = [functools.partial(one_block, n) for n in sizes[:-1]]
    branches.append(functools.partial(one_block if sizes[-1] == max_pages else loop, sizes[-1]))
    l, acc = jax.lax.switch(branch, branches)
    out = jnp.where((l == 0.0)[..., None], 0.0, acc / jnp.where(l == 0.0, 1.0, l)[..., None])
    return out.reshape(b, 1, h, hd).astype(q.dtype)


def _ragged_tpu_decode(q, kv_pages, page_table, kv_lengths, layer, kernel):
    """`paged_decode_attention` by the TPU ragged paged attention kernel: one query per sequence."""
    if kernel is None:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
        kernel = ragged_paged_attention
    b, _, h, hd = q.shape
    if layer is None:
        kv_pages, layer = kv_pages[None], 0
    n_layers, n_pages, page, kvh = kv_pages.shape[:4]
    pages = kv_pages.reshape(n_layers * n_pages, page, 2 * kvh, hd)  # free: contiguous axes merge
    table = jnp.clip(page_table.astype(jnp.int32), 0, n_pages - 1) + layer * n_pages
    lengths = kv_lengths.astype(jnp.int32)
    # A free slot (length 0) has no defined kernel output: it attends to one key, then is zeroed.
    out = kernel(q[:, 0], pages, jnp.maximum(lengths, 1), table,
                 jnp.arange(b + 1, dtype=jnp.int32), jnp.full((1,), b, jnp.int32),
                 sm_scale=hd ** -0.5)
    out = jnp.where((lengths > 0)[:, None, None], out, 0)
    return out[:, None].astype(q.dtype)


def score_block_bytes(implementation: str, rows: int, heads: int, seq: int,
                      block: int = DEFAULT_BLOCK) -> int:
    """Float32 bytes of the attention scores one layer holds at once on one device."""
    if implementation == "dense":
        return rows * heads * seq * seq * 4
    if implementation == "blockwise":
        return rows * heads * seq * min(block, seq) * 4
    return 0  # the kernels keep their score tiles in on-chip memory


__all__ = ["CHOICES", "IMPLEMENTATIONS", "target_platform", "resolve_attention",
           "dot_product_attention", "dense_attention", "attention_mask", "score_block_bytes",
           "paged_decode_attention", "PAGED_BLOCK_TOKENS", "PAGED_IMPLEMENTATIONS",
           "resolve_paged_decode", "segment_local_attention"]
