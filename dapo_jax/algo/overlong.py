"""Overlong reward shaping (DAPO paper Eq. 13) and overlong filtering (paper Sec. 3.4).

The two are independent: the paper's ablation turns on overlong filtering alone, then soft overlong
punishment; the trainer enables each from its own config switch.

* Soft overlong punishment adds ``R_length(y)`` to the score of *every* response (right or wrong):

      R_length(y) = 0                                  if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                  = -1                                 if L_max < |y|

  scaled by ``penalty_factor`` (verl's ``overlong_buffer.penalty_factor``). ``|y|`` is measured in
  tokens and counts the EOS token. It is continuous (``-factor`` at ``|y| = L_max``) and
  non-increasing in ``|y|``. verl computes ``min(-(|y| - (L_max - L_cache)) / L_cache * factor, 0)``,
  which agrees for every ``|y| <= L_max`` (verl never sees longer responses).

* Overlong filtering masks out the loss of truncated samples (hit the length limit without EOS):
  their tokens leave the token-mean denominator as well, since they leave the response mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["is_truncated", "overlong_filter_mask", "overlong_penalty"]


@jax.jit
def _penalty(lengths, max_response_length, overlong_buffer_len, penalty_factor):
    # The three scalars are traced (not static): one compile per input shape whatever the config.
    lengths = lengths.astype(jnp.float32)
    expected = (max_response_length - overlong_buffer_len).astype(jnp.float32)
    ramp = (expected - lengths) / overlong_buffer_len.astype(jnp.float32) * penalty_factor
    beyond = jnp.broadcast_to(-penalty_factor, lengths.shape)
    return jnp.where(
        lengths <= expected,
        jnp.zeros_like(lengths),
        jnp.where(lengths <= max_response_length, ramp, beyond),
    )


def overlong_penalty(
    response_lengths,
    *,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> jax.Array:
    """Soft overlong punishment ``R_length`` (Eq. 13), in tokens, times ``penalty_factor``.

    Args:
      response_lengths: int ``[N]`` (any shape), response tokens including EOS.
      max_response_length: ``L_max``, the generation limit in tokens.
      overlong_buffer_len: ``L_cache``, the punishment interval; ``0 < L_cache < L_max``.
      penalty_factor: the penalty reached at ``L_max`` (and beyond) is ``-penalty_factor``.

    Returns: float32 array like ``response_lengths``, to be *added* to each response's score.
    """
    if int(max_response_length) != max_response_length or max_response_length <= 0:
        raise ValueError(f"max_response_length must be a positive int, got {max_response_length}.")
    if int(overlong_buffer_len) != overlong_buffer_len or not 0 < overlong_buffer_len < max_response_length:
        raise ValueError(
            f"overlong_buffer_len (L_cache) must be an int with 0 < L_cache < max_response_length="
            f"{max_response_length}, got {overlong_buffer_len}. DAPO uses L_max=20480, L_cache=4096; "
            f"to switch the penalty off, don't apply it (the trainer's overlong-buffer switch)."
        )
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}.")
    lengths = jnp.asarray(response_lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"response_lengths must be integer token counts, got dtype {lengths.dtype}.")
    return _penalty(lengths, jnp.asarray(int(max_response_length), jnp.int32),
                    jnp.asarray(int(overlong_buffer_len), jnp.int32), jnp.asarray(penalty_factor, jnp.float32))


def is_truncated(response_lengths, ended_with_eos, *, max_response_length: int) -> jax.Array:
    """Bool ``[N]``: the response hit the length limit without producing EOS (cut by the sampler)."""
    lengths = jnp.asarray(response_lengths)
    eos = jnp.asarray(ended_with_eos).astype(bool)
    if lengths.shape != eos.shape:
        raise ValueError(f"response_lengths {lengths.shape} and ended_with_eos {eos.shape} must match.")
    return (lengths >= max_response_length) & ~eos


@jax.jit
def _filter(response_mask, truncated):
    keep = ~truncated.astype(bool)
    return jnp.where(keep[:, None], response_mask, jnp.zeros_like(response_mask))


def overlong_filter_mask(response_mask, truncated) -> jax.Array:
    """Overlong filtering: zero the response mask of truncated samples (same dtype as the input).

    Args:
      response_mask: ``[B, T]`` response mask.
      truncated: bool ``[B]``: cut at the length limit without EOS (see :func:`is_truncated`).

    Returns: the new ``[B, T]`` mask. Pass it to the policy loss *and* use it to count
    ``global_token_count``, so filtered tokens leave the token-mean denominator too.
    """
    response_mask = jnp.asarray(response_mask)
    truncated = jnp.asarray(truncated)
    if response_mask.ndim != 2 or truncated.shape != response_mask.shape[:1]:
        raise ValueError(
            f"response_mask must be [B, T] and truncated [B]; got {response_mask.shape} and {truncated.shape}."
        )
    return _filter(response_mask, truncated)
