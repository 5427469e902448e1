"""Host-side batch layout: samples -> rows, and rows -> optimizer mini/micro-batches.

Two layouts. Padded (`pad_rows`, `minibatches`): a row is [left-padded prompt of P tokens |
right-padded response of R tokens], so response position j is row position P + j everywhere, and a
micro-batch is a fixed number of samples. Packed (`packing_layout`, `pack_minibatch`; the default,
trainer.packing): samples end to end in rows of a few bucketed lengths, and a micro-batch is a
token budget per data-parallel rank (trainer.max_tokens_per_micro_batch), so compute follows the
tokens that exist rather than the configured maximum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Fields of one generation batch that the update reads (others are metrics-only).
ROW_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_logprobs")


def pad_rows(prompts: Sequence[Sequence[int]], responses: Sequence[np.ndarray],
             logprobs: Sequence[np.ndarray], *, prompt_length: int, response_length: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """[N, P] / [N, R] arrays of N (prompt, response, rollout log-prob) triples."""
    n, p, r = len(responses), prompt_length, response_length
    out = {"prompt_ids": np.full((n, p), pad_id, np.int32), "prompt_mask": np.zeros((n, p), np.int32),
           "response_ids": np.full((n, r), pad_id, np.int32),
           "response_mask": np.zeros((n, r), np.int32),
           "rollout_logprobs": np.zeros((n, r), np.float32)}
    for i, (prompt, resp, lp) in enumerate(zip(prompts, responses, logprobs)):
        if len(prompt) > p or len(resp) > r:
            raise ValueError(f"sample {i}: prompt {len(prompt)} / response {len(resp)} tokens exceed "
                             f"the row's {p} / {r}")
        out["prompt_ids"][i, p - len(prompt):] = prompt
        out["prompt_mask"][i, p - len(prompt):] = 1
        out["response_ids"][i, :len(resp)] = resp
        out["response_mask"][i, :len(resp)] = 1
        out["rollout_logprobs"][i, :len(resp)] = lp
    return out


def minibatches(arrays: dict[str, np.ndarray], *, mini_batch_size: int, micro_batch_size: int
                ) -> list[dict[str, np.ndarray]]:
    """Splits [N, ...] arrays into mini-batches laid out [num_micro, micro, ...].

    A short last mini-batch (dynamic sampling's "proceed" cap) is padded with all-zero rows, which
    carry no response tokens and so contribute nothing to any loss or count.
    """
    n = next(iter(arrays.values())).shape[0]
    n_mini = max(1, math.ceil(n / mini_batch_size))
    pad = n_mini * mini_batch_size - n
    if pad:
        arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                  for k, v in arrays.items()}
    per = mini_batch_size // micro_batch_size
    return [{k: v[i * mini_batch_size:(i + 1) * mini_batch_size].reshape(
        (per, micro_batch_size) + v.shape[1:]) for k, v in arrays.items()} for i in range(n_mini)]


# --------------------------------------------------------------------------------------------------
# Token-budget micro-batches of packed rows (trainer.packing)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackingLayout:
    """How packed micro-batches are shaped: every micro-batch is [num_ranks * rows, row_length]
    for one of a few (row_length, rows per rank) buckets with rows * row_length <= budget, so the
    memory of a micro-batch is the same whichever bucket a mini-batch uses and the number of
    compiled programs is at most the number of buckets."""

    budget: int  # tokens per data-parallel rank per micro-batch
    num_ranks: int  # data-parallel ranks (mesh data x fsdp)
    buckets: tuple[tuple[int, int], ...]  # (row_length, rows_per_rank), shortest rows first
    # A micro-batch's rows may be cut to a multiple of bucket / trim_steps (and of `multiple`)
    # when that computes fewer token slots: at most trim_steps lengths per bucket (1 = never cut).
    trim_steps: int = 1
    multiple: int = 16

    def trim_quantum(self, row_length: int) -> int:
        """Rows of bucket `row_length` are cut to multiples of this many tokens."""
        q = -(-row_length // max(1, self.trim_steps))
        return min(row_length, -(-q // self.multiple) * self.multiple)

    def trimmed_lengths(self, row_length: int) -> tuple[int, ...]:
        """Every length rows of bucket `row_length` may be cut to (the bucket's own included)."""
        q = self.trim_quantum(row_length)
        return tuple(sorted({min(row_length, k * q) for k in range(1, -(-row_length // q) + 1)}))

    def row_counts(self, row_length: int) -> tuple[int, ...]:
        """Rows per rank a micro-batch of `row_length` rows may have: powers of two up to the
        bucket's budget (a mini-batch with few tokens gets fewer rows, not the full budget)."""
        most = dict(self.buckets)[row_length]
        counts = [1 << i for i in range(most.bit_length()) if 1 << i < most]
        return tuple(counts + [most])

    def shapes(self) -> set[tuple[int, int]]:
        """Every (rows, row_length) a micro-batch can have: one compiled program each."""
        return {(self.num_ranks * rows, cut) for length, _ in self.buckets
                for rows in self.row_counts(length) for cut in self.trimmed_lengths(length)}

    def bucket_for(self, longest: int) -> tuple[int, int]:
        """The shortest bucket whose rows hold a sample of `longest` tokens."""
        for row_length, rows in self.buckets:
            if row_length >= longest:
                return row_length, rows
        raise ValueError(f"a sample of {longest} tokens does not fit the longest packed row "
                         f"({self.buckets[-1][0]} tokens)")


def packing_layout(max_sample_length: int, budget: int, num_ranks: int, num_buckets: int = 3,
                   multiple: int = 16, trim_steps: int = 1) -> PackingLayout:
    """Buckets of row length max_sample_length / 2^b (rounded up to `multiple`), b < num_buckets,
    each with as many rows per rank as fit `budget` tokens; rows may be cut in `trim_steps` steps
    (`PackingLayout.trimmed_lengths`).

    Raises ValueError (naming trainer.max_tokens_per_micro_batch) when the budget cannot hold one
    row of the longest possible sample.
    """
    full = -(-max_sample_length // multiple) * multiple
    if budget < full:
        raise ValueError(
            f"trainer.max_tokens_per_micro_batch={budget} cannot hold one full-length sample: "
            f"data.max_prompt_length + data.max_response_length = {max_sample_length} tokens (rows "
            f"are rounded up to multiples of {multiple}: {full}); raise it to at least {full}")
    def rounded(n: int) -> int:
        return max(multiple, -(-n // multiple) * multiple)

    lengths = sorted({rounded(-(-max_sample_length // 2 ** b)) for b in range(max(1, num_buckets))})
    if trim_steps < 1:
        raise ValueError(f"trainer.packing_trim_steps must be >= 1, got {trim_steps}")
    return PackingLayout(budget=int(budget), num_ranks=int(num_ranks),
                         buckets=tuple((n, budget // n) for n in lengths),
                         trim_steps=int(trim_steps), multiple=int(multiple))


def _balance(row_tokens: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Bin of every row: longest-processing-time first, each row to the bin with the fewest tokens
    that still has room (bins are (micro-batch, rank) pairs; `capacity[b]` rows fit bin b)."""
    capacity = np.asarray(capacity, np.int64)
    tokens = np.zeros(len(capacity), np.int64)
    count = np.zeros(len(capacity), np.int64)
    out = np.zeros(len(row_tokens), np.int64)
    for r in np.argsort(-row_tokens, kind="stable"):
        open_bins = np.flatnonzero(count < capacity)
        b = int(open_bins[np.argmin(tokens[open_bins])])
        out[r] = b
        tokens[b] += row_tokens[r]
        count[b] += 1
    return out


def micro_batch_rows(num_rows: int, layout: PackingLayout, bucket: int) -> tuple[int, ...]:
    """Rows per rank of each micro-batch that holds `num_rows` packed rows of bucket `bucket`.

    Full micro-batches of the bucket's budget, then one of the fewest allowed rows
    (`PackingLayout.row_counts`) for what is left: each rank computes about its share of the rows,
    never a whole extra micro-batch of padding rows.
    """
    most = dict(layout.buckets)[bucket]
    per_rank = max(1, -(-num_rows // layout.num_ranks))
    full, rest = divmod(per_rank, most)
    tail = [min(c for c in layout.row_counts(bucket) if c >= rest)] if rest else []
    return tuple([most] * full + tail)


@dataclasses.dataclass
class PackedMinibatch:
    """One mini-batch as packed micro-batches: `fields[k]` is [rows, L], the rows of micro-batch 0,
    then of micro-batch 1, ...; micro-batch m has `micro_rows[m]` rows (num_ranks x its rows per
    rank, rank d's rows the d-th equal slice, as the batch sharding splits them)."""

    fields: dict[str, np.ndarray]
    row_length: int
    micro_rows: tuple[int, ...]
    rank_tokens: np.ndarray  # [num_ranks] sample tokens each rank holds, over all micro-batches
    fill: float  # sample tokens / computed token slots
    token_count: float  # response tokens in the loss (the mini-batch's global token-mean count)
    seq_count: float  # samples with at least one token in the loss

    @property
    def num_micro(self) -> int:
        """Micro-batches (gradient accumulation steps) of the mini-batch."""
        return len(self.micro_rows)

    def micro(self, m: int) -> dict[str, np.ndarray]:
        """Micro-batch `m`'s fields, [micro_rows[m], L] each."""
        start = sum(self.micro_rows[:m])
        return {k: v[start:start + self.micro_rows[m]] for k, v in self.fields.items()}


def pack_minibatch(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray],
                   rollout_logprobs: np.ndarray, advantages: np.ndarray, in_loss: np.ndarray,
                   layout: PackingLayout, *, pad_id: int) -> PackedMinibatch:
    """Packs one mini-batch's samples (prompt + response, unpadded) into token-budget micro-batches.

    Samples out of the loss (overlong-filtered, or without response tokens) are left out: they
    weigh nothing in any aggregation mode, so computing them would only cost time. Rows are
    filled first-fit decreasing, then spread over (micro-batch, rank) slots longest first, so
    every rank gets about the same number of tokens (`rank_tokens`).
    """
    from dapo_jax.training import packing  # packing imports the model; batching stays light

    keep = [i for i in range(len(responses)) if in_loss[i] and len(responses[i]) > 0]
    sample_lengths = np.asarray([len(prompts[i]) + len(responses[i]) for i in keep], np.int64)
    bucket, _ = layout.bucket_for(int(sample_lengths.max()) if keep else 1)
    ranks = layout.num_ranks
    if not keep:  # nothing to train: one empty micro-batch keeps the update's shape and arithmetic
        shape = (ranks, bucket)
        fields = {"input_ids": np.full(shape, pad_id, np.int32),
                  "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
                  "response_mask": np.zeros(shape, np.int32),
                  "rollout_logprobs": np.zeros(shape, np.float32),
                  "advantages": np.zeros(shape, np.float32)}
        return PackedMinibatch(fields=fields, row_length=bucket, micro_rows=(ranks,),
                               rank_tokens=np.zeros(ranks), fill=0.0, token_count=0.0,
                               seq_count=0.0)
    # Rows of the bucket's length, or cut shorter (`PackingLayout.trimmed_lengths`): whichever
    # computes the fewest token slots. Short samples then pay for their own length, not the
    # bucket's; ties keep the shorter rows (less attention per token).
    best = None
    for cut in layout.trimmed_lengths(bucket):
        if cut < sample_lengths.max():
            continue
        trial = packing.pack(sample_lengths, cut)
        per_rank = micro_batch_rows(trial.num_rows, layout, bucket)
        if best is None or sum(per_rank) * cut < best[0]:
            best = (sum(per_rank) * cut, cut, trial, per_rank)
    _, row_length, plan, per_rank = best
    row_tokens = np.bincount(plan.row, weights=sample_lengths, minlength=plan.num_rows)
    # Bin b = (micro m, rank d), b = m * ranks + d; rank d's rows of micro-batch m are
    # d*rows_m .. (d+1)*rows_m - 1 of it, the slice of axis 0 that the batch sharding gives it.
    micro_of_bin = np.repeat(np.arange(len(per_rank)), ranks)
    bins = _balance(row_tokens, np.asarray(per_rank)[micro_of_bin])
    micro_start = np.concatenate([[0], np.cumsum(np.asarray(per_rank) * ranks)])
    position = np.zeros(plan.num_rows, np.int64)
    for b in range(len(per_rank) * ranks):
        members = np.flatnonzero(bins == b)
        m, d = divmod(b, ranks)
        position[members] = micro_start[m] + d * per_rank[m] + np.arange(len(members))
    plan = dataclasses.replace(plan, row=position[plan.row].astype(np.int32),
                               num_rows=int(micro_start[-1]))
    rank_tokens = np.bincount(bins % ranks, weights=row_tokens, minlength=ranks)
    fields = packing.packed_rows([prompts[i] for i in keep], [responses[i] for i in keep], plan,
                                 pad_id=pad_id)
    kept_lp = np.asarray(rollout_logprobs)[keep]
    fields["rollout_logprobs"] = packing.place_per_token(kept_lp, fields).astype(np.float32)
    fields["advantages"] = packing.place_per_sample(
        np.asarray(advantages, np.float32)[keep], fields).astype(np.float32)
    fields = {k: fields[k] for k in ("input_ids", "segment_ids", "positions", "response_mask",
                                     "rollout_logprobs", "advantages")}
    return PackedMinibatch(fields=fields, row_length=row_length,
                           micro_rows=tuple(int(r) * ranks for r in per_rank),
                           rank_tokens=rank_tokens,
                           fill=float(sample_lengths.sum()) / (plan.num_rows * row_length),
                           token_count=float(fields["response_mask"].sum()),
                           seq_count=float(len(keep)))
