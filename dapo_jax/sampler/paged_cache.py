"""The paged KV cache's host side: a pool of fixed-size pages, a page table per decode slot, and the
arithmetic the memory planner needs.

The device holds the pages ([layers, pages, kv_heads, page_size, head_dim] for K and for V) and a copy
of the page table; everything that decides which page goes where lives here, in numpy, because the
rollout driver already returns to the host between `generate` calls and allocation is a few list
operations per sample. Pages are reference-counted: the full prompt pages of one prefill are shared by
the n samples of that prompt, and go back to the free list when the last of them finishes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dapo_jax.models.config import ModelConfig

KV_CACHE_CHOICES = ("paged", "dense")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-int(tokens) // int(page_size))


def default_pool_tokens(slots: int, max_target_length: int, page_size: int) -> int:
    """The pool `rollout.kv_pool_tokens = 0` stands for: every slot can reach the maximum length.

    Never preempts and never needs more memory than the dense cache, so switching a config that fits
    to the paged cache keeps it fitting; set a smaller pool to trade memory for preemptions.
    """
    return slots * pages_for(max_target_length, page_size) * page_size


def page_bytes(cfg: ModelConfig, page_size: int, cache_dtype: str) -> int:
    """Bytes of one page: K and V of `page_size` tokens in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * _BYTES[cache_dtype]


@dataclasses.dataclass(frozen=True)
class KVPoolPlan:
    """What a KV pool costs and holds (see `kv_pool_plan`)."""

    num_pages: int
    page_size: int
    pool_bytes: int  # K + V pages of all layers, the whole pool
    pool_bytes_per_shard: int  # what one (data, fsdp) shard holds (before any tensor split)
    page_table_bytes: int
    dense_bytes: int  # the dense cache of the same slots, for comparison
    concurrent_samples: int  # samples of `expected_length` tokens that fit at once
    concurrent_samples_at_max: int  # samples of max_target_length tokens that fit at once


def kv_pool_plan(cfg: ModelConfig, pool_tokens: int, page_size: int, *, slots: int,
                 max_target_length: int, cache_dtype: str = "bfloat16",
                 expected_length: int | None = None, samples_per_prompt: int = 1,
                 prompt_length: int = 0, shards: int = 1) -> KVPoolPlan:
    """Bytes of a paged KV pool and how many samples it holds at once (pure; for `plan.py`).

    `pool_tokens` 0 means `default_pool_tokens`. `shards` is how many ways the decode slots are
    split (the mesh's data x fsdp when it divides `slots`): the pages are split the same way, so a
    device holds `pool_bytes_per_shard` (divided again by the tensor axis when it divides the KV
    heads), like the dense cache's slots. Samples of one prompt share its full prompt pages,
    so with `samples_per_prompt` n and `prompt_length` p a sample costs its own pages plus 1/n of the
    shared ones. `expected_length` (prompt + response, default max_target_length) sizes the
    "typical" count; the result never exceeds `slots`.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    pool_tokens = int(pool_tokens) or default_pool_tokens(slots, max_target_length, page_size)
    num_pages = -(-pages_for(pool_tokens, page_size) // shards) * shards
    per_page = page_bytes(cfg, page_size, cache_dtype)
    max_pages = pages_for(max_target_length, page_size)

    def fit(length: int) -> int:
        shared = min(max(prompt_length - 1, 0), length) // page_size
        own = pages_for(length, page_size) - shared
        cost = own + shared / max(samples_per_prompt, 1)
        return min(slots, int(num_pages // max(cost, 1e-9)))

    dense = 2 * cfg.num_layers * slots * cfg.num_kv_heads * max_target_length * cfg.head_dim \
        * _BYTES[cache_dtype]
    return KVPoolPlan(num_pages=num_pages, page_size=page_size, pool_bytes=num_pages * per_page,
                      pool_bytes_per_shard=num_pages // shards * per_page,
                      page_table_bytes=slots * max_pages * 4, dense_bytes=dense,
                      concurrent_samples=fit(expected_length or max_target_length),
                      concurrent_samples_at_max=fit(max_target_length))


class PagePool:
    """Host bookkeeping of the pool: free lists, reference counts, each slot's pages and length.

    `table[s, j]` is the pool page holding positions j*page_size .. of slot s, or `num_pages` (out
    of range: the device drops writes there) when none is allocated. `lengths` mirrors the device's
    cache lengths (positions written); `order` ranks slots by admission, newest preempted first.
    With `shards` > 1 the slots and the pages are split alike over devices (slot block d, page block
    d): a slot only ever gets pages of its own block, so decoding reads and writes locally.
    """

    def __init__(self, num_pages: int, page_size: int, slots: int, pages_per_slot: int,
                 shards: int = 1):
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.pages_per_slot = int(pages_per_slot)
        if num_pages % shards or slots % shards:
            raise ValueError(f"{num_pages} pages and {slots} slots must split into {shards} shards")
        self.shards, self.shard_pages = int(shards), self.num_pages // shards
        self.slot_shard = np.arange(slots) // (slots // shards)
        n = self.shard_pages  # a stack per shard: low ids first
        self._free = [list(range((d + 1) * n - 1, d * n - 1, -1)) for d in range(shards)]
        self.refs = np.zeros((self.num_pages,), np.int32)
        self.stamp = np.zeros((self.num_pages,), np.int64)  # bumped on every allocation
        self.table = np.full((slots, self.pages_per_slot), self.num_pages, np.int32)
        self.owned = [0] * slots  # pages in the slot's table row
        self.lengths = np.zeros((slots,), np.int64)
        self.active = np.zeros((slots,), bool)
        self.order = np.zeros((slots,), np.int64)
        self._clock = 0
        self.dirty = True  # the device copy of `table` is stale
        self.peak_pages = 0

    @property
    def free_pages(self) -> int:
        """Pages on the free lists."""
        return sum(len(f) for f in self._free)

    def free_in(self, shard: int) -> int:
        """Free pages of one shard."""
        return len(self._free[shard])

    @property
    def used_pages(self) -> int:
        """Pages referenced by some slot."""
        return self.num_pages - self.free_pages

    def alloc(self, n: int, shard: int = 0) -> list[int]:
        """`n` fresh pages of `shard` with one reference each; raises if it has fewer free."""
        free = self._free[shard]
        if n > len(free):
            raise RuntimeError(f"KV pool exhausted: {n} pages wanted, {len(free)} free"
                               + (f" in shard {shard}" if self.shards > 1 else ""))
        pages = [free.pop() for _ in range(n)]
        self.refs[pages] = 1
        self.stamp[pages] += 1
        self.peak_pages = max(self.peak_pages, self.used_pages)
        return pages

    def incref(self, pages: list[int]) -> None:
        """One more holder of `pages` (a sample sharing its prompt's pages)."""
        if pages:
            np.add.at(self.refs, np.asarray(pages, np.int64), 1)

    def decref(self, pages) -> None:
        """Drops one reference of each page; pages nobody holds go back to the free list."""
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free[int(p) // self.shard_pages].append(int(p))

    def alive(self, pages: list[int], stamps: list[int]) -> bool:
        """Whether `pages` still hold what they held when their `stamps` were taken."""
        return all(self.refs[p] > 0 and self.stamp[p] == s for p, s in zip(pages, stamps))

    def assign(self, slot: int, pages: list[int], length: int) -> None:
        """Gives `slot` the table row `pages` (references already taken) at cache length `length`."""
        self.release(slot)
        self.table[slot, :len(pages)] = pages
        self.owned[slot] = len(pages)
        self.lengths[slot] = length
        self.active[slot] = True
        self._clock += 1
        self.order[slot] = self._clock
        self.dirty = True

    def release(self, slot: int) -> None:
        """Returns the slot's pages (those nobody else holds go back to the free list)."""
        n = self.owned[slot]
        if n:
            self.decref(self.table[slot, :n].tolist())
            self.table[slot, :n] = self.num_pages
            self.owned[slot] = 0
            self.dirty = True
        self.active[slot] = False

    def shortfall(self, slot: int, upto_tokens: int) -> int:
        """Pages `slot` still needs to hold `upto_tokens` positions (capped at the slot maximum)."""
        want = min(pages_for(upto_tokens, self.page_size), self.pages_per_slot)
        return max(0, want - self.owned[slot])

    def grow(self, slot: int, upto_tokens: int) -> None:
        """Allocates the pages `slot` needs to hold `upto_tokens` positions."""
        n = self.shortfall(slot, upto_tokens)
        if n:
            pages = self.alloc(n, int(self.slot_shard[slot]))
            self.table[slot, self.owned[slot]:self.owned[slot] + n] = pages
            self.owned[slot] += n
            self.dirty = True


    def local_table(self) -> np.ndarray:
        """The page table in each shard's own page ids (what the device's per-shard decode reads);
        unallocated entries are `shard_pages` (out of range)."""
        offset = (self.slot_shard * self.shard_pages)[:, None]
        return np.where(self.table < self.num_pages, self.table - offset,
                        self.shard_pages).astype(np.int32)


def pool_pages(pool_tokens: int, page_size: int, slots: int, max_target_length: int,
               shards: int = 1) -> int:
    """Pages of a pool of `pool_tokens` tokens (0: `default_pool_tokens`), rounded up to split
    into `shards`, checked to hold one sample of the maximum length per shard (else a lone sample
    could never finish)."""
    tokens = int(pool_tokens) or default_pool_tokens(slots, max_target_length, page_size)
    n = -(-pages_for(tokens, page_size) // shards) * shards
    need = pages_for(max_target_length, page_size)
    if n // shards < need:
        raise ValueError(f"rollout.kv_pool_tokens ({tokens}) holds {n} pages of {page_size} tokens"
                         + (f", {n // shards} per shard of the {shards} the decode slots are split "
                            "into" if shards > 1 else "")
                         + f", fewer than one sample of max_target_length {max_target_length} needs "
                         f"({need}); raise rollout.kv_pool_tokens to at least "
                         f"{need * page_size * shards} (or 0 for the default)")
    return n


__all__ = ["KV_CACHE_CHOICES", "KVPoolPlan", "PagePool", "default_pool_tokens", "kv_pool_plan",
           "page_bytes", "pages_for", "pool_pages"]
