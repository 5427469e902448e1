"""The policy model: Qwen2 / Qwen2.5 (and Llama-family) decoder in Flax NNX, HF checkpoints, sharding.

Public API:
  load_pretrained(path, *, dtype="float32", mesh=None) -> (model, model_config)
  save_pretrained(model, model_config, path)
  forward(model, input_ids, attention_mask) -> logits [B, T, V]
  token_logprobs(model, input_ids, attention_mask, targets_mask) -> log-probs [B, T] (+ entropies)
"""

from __future__ import annotations

import functools

import jax

from dapo_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from dapo_jax.models.hf_checkpoint import (hf_state_dict, init_model, load_pretrained,
                                           model_from_params, param_shardings, save_pretrained)
from dapo_jax.models.logprobs import chunked_token_logprobs, sequence_logprobs
from dapo_jax.models.qwen2 import (Qwen2, decoder_apply, init_cache, lm_logits, param_logical_axes,
                                   positions_from_mask)
from dapo_jax.models.sharding import make_mesh
from dapo_jax.models.tokenizer import load_tokenizer


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, cfg, input_ids, attention_mask):
    hidden, _ = decoder_apply(params, cfg, input_ids, attention_mask)
    return lm_logits(params, cfg, hidden)


def forward(model: Qwen2, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, T, V]; padding (left or right) in `attention_mask` is respected."""
    if attention_mask is None:
        attention_mask = jax.numpy.ones(input_ids.shape, jax.numpy.int32)
    return _forward(model.params(), model.config, input_ids, attention_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "return_entropy", "chunk_size"))
def _token_logprobs(params, cfg, input_ids, attention_mask, targets_mask, return_entropy, chunk_size):
    return sequence_logprobs(params, cfg, input_ids, attention_mask, targets_mask,
                             return_entropy=return_entropy, chunk_size=chunk_size)


def token_logprobs(model: Qwen2, input_ids: jax.Array, attention_mask: jax.Array,
                   targets_mask: jax.Array | None = None, *, return_entropy: bool = False,
                   chunk_size: int = 256):
    """Per-token log-probs [B, T] of `input_ids` (0 where `targets_mask` is false, and at t = 0).

    Computed chunk-by-chunk over the sequence so [B, T, V] float32 logits never exist at once.
    Returns (logprobs, entropy) when `return_entropy`, else logprobs.
    """
    lp, ent = _token_logprobs(model.params(), model.config, input_ids, attention_mask,
                              targets_mask, return_entropy, chunk_size)
    return (lp, ent) if return_entropy else lp


__all__ = [
    "ModelConfig", "PRESETS", "preset", "from_hf_config", "to_hf_config", "Qwen2", "init_model",
    "load_pretrained", "save_pretrained", "hf_state_dict", "model_from_params", "param_shardings",
    "param_logical_axes", "forward", "token_logprobs", "sequence_logprobs", "chunked_token_logprobs",
    "decoder_apply", "lm_logits", "init_cache", "positions_from_mask", "make_mesh", "load_tokenizer",
]
