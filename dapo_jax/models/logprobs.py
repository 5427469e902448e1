"""Per-token log-probs (and entropies) without materialising [B, T, V] float32 logits.

This is the hot path of the DAPO loss: the vocabulary is ~151k, so full fp32 logits for a batch of
long responses would dwarf the model. We loop over sequence chunks and recompute each chunk's
logits in the backward pass, so peak memory is O(B * chunk * V) instead of O(B * T * V), and only
the positions that are scored (response tokens) go through the vocabulary projection.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dapo_jax.models.config import ModelConfig
from dapo_jax.models.qwen2 import Params, decoder_apply, jnp_dtype, lm_head_weight
from dapo_jax.models.sharding import with_logical_constraint


def chunked_token_logprobs(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *,
                           chunk_size: int = 256, temperature: float = 1.0,
                           return_entropy: bool = False, mesh: Mesh | None = None,
                           rules: Mapping[str, Any] | None = None, scored: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array | None]:
    """log p(targets[b, t] | hidden[b, t]) for hidden [B,T,D], weight [D,V], targets [B,T].

    Returns (logprobs [B,T] float32, entropy [B,T] float32 or None). Logits are computed chunk by
    chunk over T, forward and backward (`_chunk_loop`), so no more than one chunk's [B, C, V]
    logits exist at a time; `temperature` divides the logits first (as the sampler does).
    With `scored` [B,T] bool, only those positions are needed (the others come back as 0 or as
    their true values): each row's scored positions are moved to its front, in order, and the
    loops stop after the chunks that hold them, so prompt tokens cost no logits, forward or
    backward.
    """
    b, t, d = hidden.shape
    chunk = max(1, min(chunk_size, t))
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    order = None
    active = jnp.int32(n_chunks)
    if scored is not None:
        # Rows are gathered along T only, so a batch-sharded hidden stays where it is.
        order = jnp.argsort(jnp.logical_not(scored), axis=1, stable=True)
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        most = jnp.max(jnp.sum(scored.astype(jnp.int32), axis=1))
        active = ((most + chunk - 1) // chunk).astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    loop = _chunk_loop(chunk, float(temperature), bool(return_entropy), mesh, rules)
    lps, ents = loop(hidden, weight, targets.astype(jnp.int32), active)
    lps, ents = lps[:, :t], ents[:, :t]
    if order is not None:  # back to the rows' own order
        inverse = jnp.argsort(order, axis=1)
        lps = jnp.take_along_axis(lps, inverse, axis=1)
        ents = jnp.take_along_axis(ents, inverse, axis=1)
    return lps, (ents if return_entropy else None)


def _chunk_loop(chunk: int, temperature: float, return_entropy: bool, mesh: Mesh | None,
                rules: Mapping[str, Any] | None):
    """f(hidden [B,N*C,D], weight [D,V], targets [B,N*C], active) -> (logprobs, entropy) [B,N*C],
    computed for the first `active` chunks of C positions (the rest are 0), with its own VJP.

    Why a custom VJP: differentiating a scan over chunks accumulates the [D, V] weight
    gradient (and, for skipped chunks, a zero one) in every iteration; here the backward loop runs
    over the active chunks only, recomputes each chunk's softmax from the saved log-sum-exp, and
    adds its h^T dlogits to one float32 [D, V] sum.
    """

    def logits_of(h, weight):
        z = jnp.einsum("bcd,dv->bcv", h, weight, preferred_element_type=jnp.float32)
        z = with_logical_constraint(z, ("batch", "seq", "act_vocab"), mesh, rules)
        return z / temperature if temperature != 1.0 else z

    def piece(x, i):
        return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)

    def put(x, i, value):
        return jax.lax.dynamic_update_slice_in_dim(x, value, i * chunk, axis=1)

    def forward(hidden, weight, targets, active):
        b, n = targets.shape

        def body(i, out):
            lp, ent, lse = out
            z = logits_of(piece(hidden, i), weight)
            m = jax.nn.logsumexp(z, axis=-1)
            picked = jnp.take_along_axis(z, piece(targets, i)[..., None], axis=-1)[..., 0]
            if return_entropy:
                ent = put(ent, i, m - jnp.sum(jnp.exp(z - m[..., None]) * z, axis=-1))
            return put(lp, i, picked - m), ent, put(lse, i, m)

        zeros = jnp.zeros((b, n), jnp.float32)
        return jax.lax.fori_loop(0, active, body, (zeros, zeros, zeros))

    @jax.custom_vjp
    def loop(hidden, weight, targets, active):
        lp, ent, _ = forward(hidden, weight, targets, active)
        return lp, ent

    def loop_fwd(hidden, weight, targets, active):
        lp, ent, lse = forward(hidden, weight, targets, active)
        return (lp, ent), (hidden, weight, targets, active, ent, lse)

    def loop_bwd(res, cotangents):
        hidden, weight, targets, active, ent, lse = res
        g_lp, g_ent = cotangents

        def body(i, grads):
            dh, dw = grads
            h = piece(hidden, i)
            z = logits_of(h, weight)
            m = piece(lse, i)[..., None]
            p = jnp.exp(z - m)
            g = piece(g_lp, i)[..., None]
            onehot = jnp.arange(z.shape[-1]) == piece(targets, i)[..., None]
            dz = jnp.where(onehot, g, 0.0) - p * g  # d logp / dz = onehot - p
            if return_entropy:  # d H / dz = -p (z - E_p[z]), and E_p[z] = lse - H
                mean_z = m - piece(ent, i)[..., None]
                dz = dz - piece(g_ent, i)[..., None] * p * (z - mean_z)
            if temperature != 1.0:
                dz = dz / temperature
            dz = with_logical_constraint(dz, ("batch", "seq", "act_vocab"), mesh, rules)
            dh_i = jnp.einsum("bcv,dv->bcd", dz.astype(weight.dtype), weight,
                              preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("bcd,bcv->dv", h, dz.astype(h.dtype),
                                 preferred_element_type=jnp.float32)
            return put(dh, i, dh_i.astype(dh.dtype)), dw

        dh, dw = jax.lax.fori_loop(0, active, body, (jnp.zeros_like(hidden),
                                                       jnp.zeros(weight.shape, jnp.float32)))
        return dh, dw.astype(weight.dtype), None, None

    loop.defvjp(loop_fwd, loop_bwd)
    return loop


def sequence_logprobs(params: Params, cfg: ModelConfig, input_ids: jax.Array,
                      attention_mask: jax.Array, targets_mask: jax.Array | None = None, *,
                      return_entropy: bool = False, chunk_size: int = 256, temperature: float = 1.0,
                      mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                      positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log-probs [B,T] aligned with `input_ids` (functional core of `token_logprobs`).

    out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) where targets_mask[:, t] is true, else 0;
    position 0 has no prediction and is always 0. For packed rows (`training.packing`) pass the
    per-sample `positions` and `segment_ids` (see `decoder_apply`), and a `targets_mask` that never
    marks a sample's first token (it would be predicted from the previous sample's last one).
    Only the positions in `targets_mask` go through the vocabulary projection
    (`chunked_token_logprobs(scored=...)`): pass a `chunk_size` well below T for it to save work.
    """
    hidden, _ = decoder_apply(params, cfg, input_ids, attention_mask, positions, mesh=mesh,
                              rules=rules, segment_ids=segment_ids)
    weight = lm_head_weight(params, cfg).astype(jnp_dtype(cfg.dtype))
    if targets_mask is None:
        targets_mask = attention_mask
    m = targets_mask.astype(bool).at[:, 0].set(False)
    lp, ent = chunked_token_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], chunk_size=chunk_size,
                                     temperature=temperature, return_entropy=return_entropy,
                                     mesh=mesh, rules=rules, scored=m[:, 1:])
    zeros = jnp.zeros((input_ids.shape[0], 1), jnp.float32)
    lp = jnp.concatenate([zeros, lp], axis=1)
    ent = None if ent is None else jnp.concatenate([zeros, ent], axis=1)
    lp = jnp.where(m, lp, 0.0)
    ent = None if ent is None else jnp.where(m, ent, 0.0)
    return lp, ent
