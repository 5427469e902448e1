"""Per-token log-probs (and entropies) without materialising [B, T, V] float32 logits.

This is the hot path of the DAPO loss: the vocabulary is ~151k, so full fp32 logits for a batch of
long responses would dwarf the model. We scan over sequence chunks and rematerialise each chunk's
logits in the backward pass, so peak memory is O(B * chunk * V) instead of O(B * T * V).
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
                           rules: Mapping[str, Any] | None = None
                           ) -> tuple[jax.Array, jax.Array | None]:
    """log p(targets[b, t] | hidden[b, t]) for hidden [B,T,D], weight [D,V], targets [B,T].

    Returns (logprobs [B,T] float32, entropy [B,T] float32 or None). Logits are computed chunk by chunk
    over T inside a rematerialised scan; `temperature` divides the logits first (as the sampler does).
    """
    b, t, d = hidden.shape
    chunk = max(1, min(chunk_size, t))
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)  # [N, B, C, D]
    ts = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h, tgt):
        logits = jnp.einsum("bcd,dv->bcv", h, weight, preferred_element_type=jnp.float32)
        logits = with_logical_constraint(logits, ("batch", "seq", "act_vocab"), mesh, rules)
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        lp = picked - lse
        if not return_entropy:
            return lp, jnp.zeros_like(lp)
        probs = jnp.exp(logits - lse[..., None])
        ent = lse - jnp.sum(probs * logits, axis=-1)
        return lp, ent

    def body(_, xs):
        return None, one_chunk(*xs)

    _, (lps, ents) = jax.lax.scan(body, None, (hs, ts))
    lps = lps.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    ents = ents.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    return lps, (ents if return_entropy else None)


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
    """
    hidden, _ = decoder_apply(params, cfg, input_ids, attention_mask, positions, mesh=mesh,
                              rules=rules, segment_ids=segment_ids)
    weight = lm_head_weight(params, cfg).astype(jnp_dtype(cfg.dtype))
    lp, ent = chunked_token_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], chunk_size=chunk_size,
                                     temperature=temperature, return_entropy=return_entropy,
                                     mesh=mesh, rules=rules)
    zeros = jnp.zeros((input_ids.shape[0], 1), jnp.float32)
    lp = jnp.concatenate([zeros, lp], axis=1)
    ent = None if ent is None else jnp.concatenate([zeros, ent], axis=1)
    if targets_mask is None:
        targets_mask = attention_mask
    m = targets_mask.astype(bool).at[:, 0].set(False)
    lp = jnp.where(m, lp, 0.0)
    ent = None if ent is None else jnp.where(m, ent, 0.0)
    return lp, ent
