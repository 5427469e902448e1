"""Token sampling: temperature, top-k, top-p and greedy, with the log-probs the trainer needs."""

from __future__ import annotations

import dataclasses
import math

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


# Top-p looks for its nucleus among this many most likely tokens first: exact whenever they hold at
# least top_p of the mass (almost always for a trained LLM), and bisects over the logits otherwise.
TOP_P_CANDIDATES = 256


def _nucleus_cutoff(sorted_x: jax.Array, lse: jax.Array, top_p: float) -> jax.Array:
    """Smallest kept logit [B, 1] given descending logits and each row's full logsumexp [B, 1]."""
    probs = jnp.exp(sorted_x - lse)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
    # before it is < top_p (so the most likely token is always kept).
    before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.min(jnp.where(before < top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (so a bisection over values is one over integers)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    i = i ^ ((i >> 31) & 0x7FFFFFFF)  # negative floats count down: flip their magnitude bits
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _nucleus_cutoff_by_bisection(x: jax.Array, lse: jax.Array, top_p: float) -> jax.Array:
    """The top-p cutoff without sorting: the largest logit c with mass(x >= c) >= top_p.

    That is the logit of the token where the sorted cumulative mass first reaches top_p, the same
    cutoff as `_nucleus_cutoff`. 32 halvings over the order-preserving integer image of float32
    find it exactly, each one pass over the row, instead of an O(V log V) sort per row.
    """
    probs = jnp.exp(x - lse)
    keys = _ordered(x)
    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)  # mass(x >= lo) = 1 >= top_p

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(jnp.where(keys >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.min(jnp.where(keys >= lo[:, None], x, jnp.inf), axis=-1, keepdims=True)


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
        lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
        k = min(TOP_P_CANDIDATES, x.shape[-1])
        top = jax.lax.top_k(x, k)[0]
        # Tokens outside the top k have at least the top k's mass before them: when that reaches
        # top_p they are all cut, so the candidates decide the nucleus exactly.
        enough = jnp.all(jnp.sum(jnp.exp(top - lse), axis=-1) >= params.top_p)
        cutoff = jax.lax.cond(
            enough, lambda: _nucleus_cutoff(top, lse, params.top_p),
            lambda: _nucleus_cutoff_by_bisection(x, lse, params.top_p))
        x = jnp.where(x < cutoff, neg, x)
    return x


def _block_size(vocab: int) -> int:
    """Block length of the two-stage draw: near sqrt(vocab), so each stage draws about sqrt(V) numbers.

    A divisor of the vocabulary within 4x of sqrt(V) when there is one (151,936 = 1187 blocks of 128),
    so the logits reshape into blocks in place; otherwise a power of two, and the logits get padded.
    """
    root = math.sqrt(vocab)
    divisors = [d for d in range(max(1, math.ceil(root / 4)), math.floor(4 * root) + 1)
                if vocab % d == 0]
    if divisors:
        return min(divisors, key=lambda d: (abs(math.log(d / root)), d))
    return 1 << max(0, math.ceil(math.log2(root)))


def _categorical(keys: jax.Array, x: jax.Array, vocab_axis: int = -1
                 ) -> tuple[jax.Array, jax.Array]:
    """Exact draws from softmax(x) per row, and each row's logsumexp [B].

    x is [B, V], or [V, B] with `vocab_axis=0` (the out-major engine's logits: no transpose). Two-stage
    Gumbel-max: a block of the vocabulary by its total mass, then a token within it.
    P(token) = P(block) P(token | block), so the law is exactly softmax(x), while the random numbers
    drop from V to about 2 sqrt(V) per row: at V = 152k that removes most of a decode step's sampling
    time on CPU. The noise depends only on the key and V, not on the layout.
    """
    vocab_major = vocab_axis in (0, -x.ndim)
    v = x.shape[0] if vocab_major else x.shape[-1]
    block = _block_size(v)
    nb = -(-v // block)
    neg = jnp.finfo(jnp.float32).min
    if vocab_major:
        xb = jnp.pad(x, ((0, nb * block - v), (0, 0)), constant_values=neg)
        xb = xb.reshape(nb, block, x.shape[1])
        block_lse = jax.nn.logsumexp(xb, axis=1).T  # [B, nb]
        rows_axis = 2
    else:
        xb = jnp.pad(x, ((0, 0), (0, nb * block - v)), constant_values=neg)
        xb = xb.reshape(x.shape[0], nb, block)
        block_lse = jax.nn.logsumexp(xb, axis=-1)  # [B, nb]
        rows_axis = 0
    lse = jax.nn.logsumexp(block_lse, axis=-1)

    def draw(key, blse, rows):
        k1, k2 = jax.random.split(key)
        i = jnp.argmax(blse + jax.random.gumbel(k1, blse.shape))
        j = jnp.argmax(rows[i] + jax.random.gumbel(k2, (block,)))
        return i * block + j

    return jax.vmap(draw, in_axes=(0, 0, rows_axis))(keys, block_lse, xb), lse


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams, *,
                  vocab_axis: int = -1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row. logits [B, V] float (or [V, B] with `vocab_axis=0`), keys [B].

    Returns (tokens [B], log-prob under the sampling distribution [B], log-prob under the policy
    at the sampling temperature, log_softmax(logits / T) without top-k / top-p [B]: the policy the
    trainer optimises; T = 1 for greedy). Vocab-major logits are sampled in place for greedy and
    temperature-only sampling; top-k / top-p transpose them to [B, V] first.
    """
    logits = logits.astype(jnp.float32)
    vocab_major = vocab_axis in (0, -logits.ndim)
    if vocab_major and (params.top_k or params.top_p < 1.0):
        logits, vocab_major = logits.T, False
    axis = 0 if vocab_major else -1
    if vocab_major:
        cols = jnp.arange(logits.shape[1])
        pick = lambda a, t: a[t, cols]  # noqa: E731
    else:
        pick = lambda a, t: jnp.take_along_axis(a, t[:, None], axis=-1)[:, 0]  # noqa: E731
    if params.is_greedy:
        tokens = jnp.argmax(logits, axis=axis)
        sample_lp = jnp.zeros(tokens.shape, jnp.float32)
        policy, policy_lse = logits, jax.nn.logsumexp(logits, axis=axis)
    else:
        x = sampling_logits(logits, params)  # temperature only, if still vocab-major: any layout
        tokens, lse = _categorical(keys, x, axis)
        sample_lp = pick(x, tokens) - lse
        if params.top_p == 1.0 and not params.top_k:  # x is logits / T: the policy itself
            policy, policy_lse = x, lse
        else:
            policy = sampling_logits(logits, SamplingParams(temperature=params.temperature))
            policy_lse = jax.nn.logsumexp(policy, axis=axis)
    pol = pick(policy, tokens) - policy_lse
    return tokens.astype(jnp.int32), sample_lp, pol
