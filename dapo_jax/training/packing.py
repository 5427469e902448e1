"""Packed sequences for the log-prob and update passes (issue 15): no padding, same numbers.

The unpacked layout spends every row on [left-padded prompt P | right-padded response R]. Packing
puts samples (prompt + response, no padding) end to end into rows of a fixed `row_length`:

* `pack` assigns samples to rows (first-fit decreasing) and returns a `PackPlan`;
* `packed_rows` lays the tokens out: segment ids (1..k per row, 0 = padding) keep attention inside
  a sample, positions restart at 0 per sample, and `sample_index` / `response_index` say which
  sample and which response token each position holds;
* `place_per_sample` / `place_per_token` move advantages and [N, R] per-token values (rollout or old
  log-probs) into the packed layout; `unpack_tokens` (numpy) and `unpack_tokens_jnp` (a jittable
  gather, indices from `unpack_indices`) move packed per-token results back to [N, R];
* `packed_logprobs` is `sequence_logprobs` on packed rows;
* `packed_policy_loss` is `algo.compute_policy_loss` on packed rows: the same loss, gradients and
  metrics as the unpacked [N, R] batch of the same samples, in all five aggregation modes.

A response token is predicted from the position before it, which is its own sample's prompt (every
sample needs a prompt of at least one token), so no prediction ever crosses a sample boundary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax.algo.policy_loss import _per_token, _safe_den, _validate_agg, _validate_clip
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.logprobs import sequence_logprobs

__all__ = ["PackPlan", "pack", "packed_rows", "place_per_sample", "place_per_token",
           "unpack_tokens", "unpack_indices", "unpack_tokens_jnp", "packed_logprobs",
           "packed_policy_loss"]


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where each of N samples sits: row `row[i]`, tokens offset[i] .. offset[i] + lengths[i] - 1,
    segment id `segment[i]` (1-based, in placement order within the row)."""

    row_length: int
    lengths: np.ndarray  # [N] tokens per sample (prompt + response)
    row: np.ndarray  # [N]
    offset: np.ndarray  # [N]
    segment: np.ndarray  # [N]
    num_rows: int

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def fill(self) -> float:
        """Fraction of the used rows' tokens that hold sample tokens (1.0 = no padding)."""
        return float(self.lengths.sum()) / max(self.num_rows * self.row_length, 1)

    def rows(self) -> list[list[int]]:
        """Sample indices of every row, in order along the row."""
        out: list[list[int]] = [[] for _ in range(self.num_rows)]
        for i in np.lexsort((self.offset, self.row)):
            out[self.row[i]].append(int(i))
        return out


def pack(lengths: Sequence[int] | np.ndarray, row_length: int) -> PackPlan:
    """First-fit decreasing: samples by decreasing length (ties by index), each into the first row
    with room, else a new row. Deterministic; a sample longer than `row_length` is an error."""
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if not isinstance(row_length, (int, np.integer)) or row_length < 1:
        raise ValueError(f"row_length must be a positive int, got {row_length!r}")
    if (lengths < 1).any():
        bad = np.flatnonzero(lengths < 1)
        raise ValueError(f"samples {bad[:8].tolist()} have {lengths[bad[:8]].tolist()} tokens; every "
                         f"sample needs at least one (its prompt)")
    if (lengths > row_length).any():
        bad = np.flatnonzero(lengths > row_length)
        raise ValueError(
            f"sample {int(bad[0])} has {int(lengths[bad[0]])} tokens (prompt + response), more than "
            f"the packed row_length {row_length} ({len(bad)} samples too long); raise row_length to "
            f"at least max prompt + max response length ({int(lengths.max())})")
    n = len(lengths)
    row = np.zeros(n, np.int32)
    offset = np.zeros(n, np.int32)
    segment = np.zeros(n, np.int32)
    free = np.zeros(n, np.int64)  # free tokens of each opened row (at most one row per sample)
    count = np.zeros(n, np.int32)
    used = 0
    for i in np.argsort(-lengths, kind="stable"):
        fits = free[:used] >= lengths[i]
        r = int(np.argmax(fits)) if used and fits.any() else used
        if r == used:
            free[r] = row_length
            used += 1
        row[i], offset[i] = r, row_length - free[r]
        count[r] += 1
        segment[i] = count[r]
        free[r] -= lengths[i]
    return PackPlan(row_length=int(row_length), lengths=lengths, row=row, offset=offset,
                    segment=segment, num_rows=used)


def _check_samples(prompts, responses, plan: PackPlan) -> tuple[np.ndarray, np.ndarray]:
    p = np.array([len(x) for x in prompts], np.int64)
    r = np.array([len(x) for x in responses], np.int64)
    if not len(p) == len(r) == plan.num_samples:
        raise ValueError(f"{len(p)} prompts and {len(r)} responses for a plan of {plan.num_samples} "
                         f"samples")
    if (p < 1).any():
        raise ValueError(f"sample {int(np.argmax(p < 1))} has an empty prompt: its first response "
                         f"token would be predicted from the previous sample in the row")
    if not np.array_equal(p + r, plan.lengths):
        i = int(np.argmax(p + r != plan.lengths))
        raise ValueError(f"sample {i} has {p[i]} + {r[i]} tokens but the plan packed "
                         f"{plan.lengths[i]}; build the plan from these prompts and responses")
    return p, r


def packed_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                plan: PackPlan, *, num_rows: int | None = None, pad_id: int = 0
                ) -> dict[str, np.ndarray]:
    """[num_rows, row_length] int32 arrays of the samples laid out by `plan`.

    input_ids, attention_mask (1 on sample tokens), segment_ids (1..k per row, 0 = padding),
    positions (0 at each sample's first token), response_mask (the scored tokens: responses),
    sample_index (sample of each token, -1 on padding), response_index (j for the j-th response
    token, -1 elsewhere). `num_rows` (default `plan.num_rows`) pads with empty rows to a fixed shape.
    """
    p_len, _ = _check_samples(prompts, responses, plan)
    rows = plan.num_rows if num_rows is None else int(num_rows)
    if rows < plan.num_rows:
        raise ValueError(f"the plan needs {plan.num_rows} rows of {plan.row_length} tokens but only "
                         f"num_rows={rows} were allowed; raise num_rows or row_length")
    shape = (rows, plan.row_length)
    out = {"input_ids": np.full(shape, pad_id, np.int32), "attention_mask": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
           "response_mask": np.zeros(shape, np.int32), "sample_index": np.full(shape, -1, np.int32),
           "response_index": np.full(shape, -1, np.int32)}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        r, o, n, pl = plan.row[i], plan.offset[i], plan.lengths[i], p_len[i]
        span = slice(o, o + n)
        out["input_ids"][r, span] = np.concatenate([np.asarray(prompt, np.int64),
                                                    np.asarray(response, np.int64)])
        out["attention_mask"][r, span] = 1
        out["segment_ids"][r, span] = plan.segment[i]
        out["positions"][r, span] = np.arange(n)
        out["sample_index"][r, span] = i
        out["response_mask"][r, o + pl:o + n] = 1
        out["response_index"][r, o + pl:o + n] = np.arange(n - pl)
    return out


def place_per_sample(values: np.ndarray, packed: Mapping[str, np.ndarray]) -> np.ndarray:
    """values [N] (e.g. advantages) on every token of their sample; 0 on padding."""
    values = np.asarray(values)
    idx = packed["sample_index"]
    return np.where(idx >= 0, values[np.maximum(idx, 0)], np.zeros((), values.dtype))


def place_per_token(values: np.ndarray, packed: Mapping[str, np.ndarray]) -> np.ndarray:
    """values [N, R] in the trainer's response layout (e.g. rollout log-probs) onto their response
    tokens in the packed layout; 0 elsewhere."""
    values = np.asarray(values)
    idx, j = packed["sample_index"], packed["response_index"]
    scored = j >= 0
    return np.where(scored, values[np.maximum(idx, 0), np.maximum(j, 0)], np.zeros((), values.dtype))


def unpack_indices(plan: PackPlan, response_lengths: Sequence[int] | np.ndarray,
                   response_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat_index [N, R] int32 into the flattened packed rows, valid [N, R] bool) for
    `unpack_tokens_jnp`: response token j of sample i sits at row[i] * L + its column."""
    r_len = np.asarray(response_lengths, np.int64).reshape(-1)
    if len(r_len) != plan.num_samples:
        raise ValueError(f"{len(r_len)} response lengths for a plan of {plan.num_samples} samples")
    if (r_len > response_length).any() or (r_len > plan.lengths - 1).any() or (r_len < 0).any():
        i = int(np.argmax((r_len > response_length) | (r_len > plan.lengths - 1) | (r_len < 0)))
        raise ValueError(f"sample {i}: response of {r_len[i]} tokens does not fit R={response_length} "
                         f"after a non-empty prompt in its {plan.lengths[i]} packed tokens")
    j = np.arange(response_length)[None, :]
    start = plan.row.astype(np.int64) * plan.row_length + plan.offset + plan.lengths - r_len
    valid = j < r_len[:, None]
    flat = np.where(valid, start[:, None] + j, 0).astype(np.int32)
    return flat, valid


def unpack_tokens(packed: np.ndarray, plan: PackPlan, response_lengths: Sequence[int] | np.ndarray,
                  response_length: int) -> np.ndarray:
    """Per-token values [rows, L] on packed rows -> [N, R] (trainer layout, 0 past each response)."""
    packed = np.asarray(packed)
    flat, valid = unpack_indices(plan, response_lengths, response_length)
    return np.where(valid, packed.reshape(-1)[flat], np.zeros((), packed.dtype))


def unpack_tokens_jnp(packed: jax.Array, flat_index: jax.Array, valid: jax.Array) -> jax.Array:
    """Jittable `unpack_tokens`: a gather with indices from `unpack_indices` (differentiable)."""
    out = jnp.take(packed.reshape(-1), flat_index, axis=0)
    return jnp.where(valid, out, jnp.zeros_like(out))


def packed_logprobs(params: Any, cfg: ModelConfig, packed: Mapping[str, jax.Array], *,
                    return_entropy: bool = False, chunk_size: int = 256, temperature: float = 1.0,
                    mesh: Any = None, rules: Mapping[str, Any] | None = None
                    ) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log-probs (and entropies) [rows, L] of the response tokens of packed rows."""
    return sequence_logprobs(params, cfg, packed["input_ids"], packed["attention_mask"],
                             packed["response_mask"], return_entropy=return_entropy,
                             chunk_size=chunk_size, temperature=temperature, mesh=mesh, rules=rules,
                             positions=packed["positions"], segment_ids=packed["segment_ids"])


# --------------------------------------------------------------------------------------------------
# The loss on packed rows
# --------------------------------------------------------------------------------------------------


def _aggregate_samples(tok_sum, seq_sum, seq_tok, mode, global_token_count, global_seq_count,
                       loss_scale_length, micro_batch_weight, num_dp_ranks):
    """`policy_loss._aggregate` from per-sample sums: every mode only needs, per sample, the sum of
    its tokens' losses and its token count (tok_sum is the plain sum over all tokens)."""
    dtype = seq_sum.dtype
    if mode == "token-mean":
        den = jnp.sum(seq_tok) if global_token_count is None else global_token_count.astype(dtype)
        return tok_sum / _safe_den(den)
    if mode == "verl-legacy-token-mean":
        # Rank chunks are contiguous runs of *samples* (the unpacked micro-batch's rows).
        n, r = seq_sum.shape[0], num_dp_ranks
        chunk_mean = seq_sum.reshape(r, n // r).sum(1) / _safe_den(seq_tok.reshape(r, n // r).sum(1))
        weight = 1.0 if micro_batch_weight is None else micro_batch_weight.astype(dtype)
        return weight * jnp.mean(chunk_mean)
    nonempty = (seq_tok > 0).astype(dtype)
    seq_den = jnp.sum(nonempty) if global_seq_count is None else global_seq_count.astype(dtype)
    if mode == "seq-mean-token-mean":
        return jnp.sum(seq_sum / _safe_den(seq_tok) * nonempty) / _safe_den(seq_den)
    if mode == "seq-mean-token-sum":
        return jnp.sum(seq_sum) / _safe_den(seq_den)
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(seq_sum) / _safe_den(seq_den) / loss_scale_length
    raise AssertionError(mode)  # unreachable: validated


@functools.partial(jax.jit, static_argnames=(
    "num_samples", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_agg_mode",
    "loss_scale_length", "log_ratio_clamp", "num_dp_ranks"))
def _packed_loss_jit(old_log_prob, log_prob, advantages, response_mask, sample_index,
                     global_token_count, global_seq_count, micro_batch_weight, *, num_samples,
                     clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode, loss_scale_length,
                     log_ratio_clamp, num_dp_ranks):
    valid = (response_mask > 0) & (sample_index >= 0)
    if advantages.ndim == 1:  # per sample -> per token
        advantages = jnp.take(advantages, jnp.maximum(sample_index, 0), axis=0)
    per_tok, ind = _per_token(old_log_prob, log_prob, advantages, valid, clip_ratio_low,
                              clip_ratio_high, clip_ratio_c, log_ratio_clamp)
    dtype = per_tok.dtype
    # Tokens that are not scored go to an extra bucket, dropped after the segment sum.
    seg = jnp.where(valid, sample_index, num_samples).reshape(-1)

    def masked(x):
        return jnp.where(valid, x.astype(dtype), jnp.zeros((), dtype))

    def per_sample(x):
        return jax.ops.segment_sum(masked(x).reshape(-1), seg, num_samples + 1)[:num_samples]

    seq_tok = per_sample(jnp.ones_like(per_tok))
    loss = _aggregate_samples(jnp.sum(masked(per_tok)), per_sample(per_tok), seq_tok, loss_agg_mode,
                              global_token_count, global_seq_count, loss_scale_length,
                              micro_batch_weight, num_dp_ranks)
    token_count = jnp.sum(valid.astype(dtype))
    metrics = {"token_count": token_count, "seq_count": jnp.sum((seq_tok > 0).astype(dtype))}
    for name, x in ind.items():
        s = jnp.sum(masked(jax.lax.stop_gradient(x)))
        metrics[name + "_sum"] = s
        metrics[name] = s / _safe_den(token_count)
    return loss, metrics


def packed_policy_loss(
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    sample_index: jax.Array,
    *,
    num_samples: int,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    loss_agg_mode: str = "token-mean",
    global_token_count: jax.Array | float | None = None,
    global_seq_count: jax.Array | float | None = None,
    loss_scale_length: float | None = None,
    log_ratio_clamp: float | None = None,
    micro_batch_weight: jax.Array | float | None = None,
    num_dp_ranks: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`algo.compute_policy_loss` of N samples packed in rows: the same (loss, metrics) as on their
    unpacked [N, R] batch, for every `loss_agg_mode`.

    old_log_prob, log_prob, response_mask, sample_index: [rows, L] from `packed_rows` (sample_index
    in 0..num_samples-1, -1 on padding); advantages: [num_samples] or per token [rows, L].

    Denominators: ``token-mean`` divides by the token count (or `global_token_count`); the
    ``seq-mean-*`` modes segment-sum each sample's tokens and divide by the non-empty sample count
    (or `global_seq_count`); ``seq-mean-token-sum-norm`` needs `loss_scale_length` explicitly (the
    unpacked default, the row's R, has no packed counterpart); ``verl-legacy-token-mean`` splits
    the *samples* 0..num_samples-1 into `num_dp_ranks` contiguous chunks, as the unpacked
    micro-batch of the same samples splits its rows, so `num_samples` must be that micro-batch's
    size (empty samples included).
    """
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    _validate_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c)
    _validate_agg(loss_agg_mode, loss_scale_length=loss_scale_length, num_dp_ranks=num_dp_ranks,
                  batch_size=int(num_samples), micro_batch_weight=micro_batch_weight)
    if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_length is None:
        raise ValueError("packed seq-mean-token-sum-norm needs loss_scale_length (the unpacked "
                         "default is the response width R; pass it, e.g. the max response length)")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp}.")
    shapes = {name: jnp.shape(x) for name, x in (("old_log_prob", old_log_prob), ("log_prob", log_prob),
                                                 ("response_mask", response_mask),
                                                 ("sample_index", sample_index))}
    if len(set(shapes.values())) != 1 or len(shapes["log_prob"]) != 2:
        raise ValueError(f"packed per-token arrays must all be [rows, L]; got {shapes}")
    if jnp.shape(advantages) not in ((num_samples,), shapes["log_prob"]):
        raise ValueError(f"advantages must be [num_samples]={[num_samples]} or [rows, L]="
                         f"{list(shapes['log_prob'])}, got {list(jnp.shape(advantages))}")
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
    return _packed_loss_jit(
        jnp.asarray(old_log_prob), jnp.asarray(log_prob), jnp.asarray(advantages),
        jnp.asarray(response_mask), jnp.asarray(sample_index), f32(global_token_count),
        f32(global_seq_count), f32(micro_batch_weight), num_samples=int(num_samples),
        clip_ratio_low=float(clip_ratio_low), clip_ratio_high=float(clip_ratio_high),
        clip_ratio_c=None if clip_ratio_c is None else float(clip_ratio_c),
        loss_agg_mode=loss_agg_mode,
        loss_scale_length=None if loss_scale_length is None else float(loss_scale_length),
        log_ratio_clamp=None if log_ratio_clamp is None else float(log_ratio_clamp),
        num_dp_ranks=num_dp_ranks)
