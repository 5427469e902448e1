"""Token sampling: temperature, top-k, top-p and greedy, with the log-probs the trainer needs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 (or greedy=True) means argmax; top_k 0 means no top-k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        """True when tokens are chosen by argmax."""
        return self.greedy or self.temperature == 0.0


def sampling_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The logits of the distribution actually sampled from (-inf outside top-k / top-p)."""
    x = logits.astype(jnp.float32)
    if params.temperature not in (0.0, 1.0):
        x = x / params.temperature
    neg = jnp.finfo(jnp.float32).min
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg, x)
    if params.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
        # before it is < top_p (so the most likely token is always kept).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < params.top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, neg, x)
    return x


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row. logits [B, V] float, keys [B] PRNG keys.

    Returns (tokens [B], log-prob under the sampling distribution [B], log-prob under the
    unmodified policy, i.e. log_softmax(logits) [B]).
    """
    policy_lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if params.is_greedy:
        tokens = jnp.argmax(logits, axis=-1)
        sample_lp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        x = sampling_logits(logits, params)
        tokens = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, x)
        sample_lp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], -1)[:, 0]
    pol = jnp.take_along_axis(policy_lp, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), sample_lp, pol
