"""The decode engine over a paged KV cache: memory is a pool of pages, decode reads only used pages.

Same JetStream API and the same tokens as `Engine` (which keeps one [max_target_length] cache row
per slot); the differences are where K/V live and what a step reads:

- The cache is a pool of `kv_pool_tokens / kv_page_size` pages ([layers, pages, page, kv_heads, 2,
  head_dim]: a KV head's key and value side by side, the TPU ragged paged attention kernel's layout)
  and a page table [slots, pages_per_slot]; `paged_cache.PagePool` (host side) hands pages
  out as samples grow and takes them back when they finish.
- Prefill packs prompts: `prefill_many` puts several prompts in one row (segment ids keep each
  prompt's attention to itself, positions restart per prompt) padded only to the row's bucket, so
  prefill computes the prompts' tokens, not one power-of-two bucket per prompt. A prefix is its
  row's K/V in the pool's token-major layout plus where the prompt sits in it.
- `insert_many` copies a prompt's full pages from the row once and shares them among the slots of
  its samples; only the partly filled last prompt page is copied per sample (decoding writes into
  it). The copy gathers exactly the pages written.
- A decode step's attention (`attention.paged_decode_attention`) loops over the pages in use, up to
  the longest live sample, so its cost follows the generated lengths, not max_target_length.
- Before a `generate` of `num_steps` steps each live slot must own pages for `num_steps` more
  tokens. `reserve` allocates them; when the pool is short it preempts the newest samples: their
  pages are copied to the host (`Preempted`) and given back, and `resume` later puts them into a slot
  exactly as they were, so a preempted sample continues with the same tokens and log-probs.

Sharded like the dense cache: slots and pages are split over (data, fsdp) alike (slot block d
only gets pages of page block d, so each device decodes its slots from its own pages), KV heads over
`tensor`; allocation, prompt sharing and preemption happen per shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dapo_jax.models.config import ModelConfig
from dapo_jax.models.qwen2 import (Params, decoder_apply, jnp_dtype, mesh_axes_size,
                                   paged_cache_specs)
from dapo_jax.models.sharding import named_sharding
from dapo_jax.runtime.host_transfer import tree_to_host
from dapo_jax.sampler.engine import (DecodeState, Engine, Prefix, ResultTokens,
                                     inserted_slot_state, prefill_buckets)
from dapo_jax.sampler.paged_cache import KV_CACHE_CHOICES, PagePool, pages_for, pool_pages
from dapo_jax.sampler.sampling import SamplingParams

DEFAULT_PAGE_SIZE = 16
DEFAULT_PREFILL_ROW_TOKENS = 2048  # tokens per packed prefill call (at least max_prefill_length)


@dataclasses.dataclass
class PrefixPages:
    """Host-side facts about a prefix: its prompt, where its K/V sit in its prefill row, and the
    pool pages its samples share."""

    true_length: int
    last_token: int
    start: int = 0  # the prompt's first position in the row (packed prefill puts several in one)
    shared: dict[int, tuple[list[int], list[int]]] = dataclasses.field(default_factory=dict)
    # per pool shard: (its shared pages, their allocation stamps when written)


@dataclasses.dataclass
class Preempted:
    """A preempted sample as the host holds it: its pages' K/V and its slot's decode vectors."""

    arrays: dict[str, np.ndarray]
    length: int  # cache positions written
    order: int  # admission rank: resumed samples keep their seniority (the newest go first)

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return sum(int(a.nbytes) for a in self.arrays.values())


class PagedEngine(Engine):
    """`Engine` with a paged KV cache (`kv_pool_tokens` tokens in pages of `kv_page_size`).

    `kv_pool_tokens` 0 sizes the pool so every slot can reach max_target_length (never preempts).
    """

    kv_cache = "paged"

    def __init__(self, model_config: ModelConfig, *, kv_pool_tokens: int = 0,
                 kv_page_size: int = DEFAULT_PAGE_SIZE,
                 prefill_row_tokens: int = DEFAULT_PREFILL_ROW_TOKENS, **kwargs: Any):
        if kv_page_size < 1:
            raise ValueError(f"kv_page_size must be >= 1, got {kv_page_size}")
        if prefill_row_tokens < 1:
            raise ValueError(f"prefill_row_tokens must be >= 1, got {prefill_row_tokens}")
        self.page_size = int(kv_page_size)
        self.pages_per_slot = pages_for(int(kwargs["max_target_length"]), self.page_size)
        self._pool_tokens = int(kv_pool_tokens)
        super().__init__(model_config, **kwargs)  # sizes the pool (_state_shardings)
        self.prefill_row_tokens = max(int(prefill_row_tokens), self.max_prefill_length)
        self.prefill_batch_tokens = self.prefill_row_tokens
        self.row_buckets = prefill_buckets(self.prefill_row_tokens,
                                           kwargs.get("min_prefill_bucket", 16))
        self.pool: PagePool | None = None
        self._preempt_fn = None
        self._resume_fn = None
        self.preemptions = 0

    # -- shardings -----------------------------------------------------------------------------
    def _state_shardings(self) -> DecodeState:
        cfg, s = self.config, self._slots
        # Pages split over the devices that split the slots: each holds its slots' pages.
        spec, rows, _ = paged_cache_specs(self.mesh, self.rules, s, cfg.num_kv_heads)
        self.shards = mesh_axes_size(self.mesh, rows)
        self.num_pages = pool_pages(self._pool_tokens, self.page_size, s, self.max_target_length,
                                    self.shards)
        kv = NamedSharding(self.mesh, spec)
        table = named_sharding(self.mesh, ("cache_batch", None), (s, self.pages_per_slot),
                               self.rules)
        vec = named_sharding(self.mesh, ("cache_batch",), (s,), self.rules)
        keys = named_sharding(self.mesh, ("cache_batch", None), (s, 2), self.rules)
        return {"cache": {"kv": kv, "lengths": vec, "page_table": table}, "tokens": vec,
                "active": vec, "generated": vec, "limit": vec, "keys": keys}

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes of the K and V pages (the whole pool, all shards together)."""
        cfg = self.config
        return (2 * cfg.num_layers * self.num_pages * cfg.num_kv_heads * self.page_size
                * cfg.head_dim * jnp.dtype(jnp_dtype(self.cache_dtype)).itemsize)

    # -- state ---------------------------------------------------------------------------------
    def init_decode_state(self) -> DecodeState:
        """An empty decode state: an empty pool, every slot free (resets the host page table)."""
        if self._init_state is None:
            cfg, s, n = self.config, self._slots, self.num_pages
            dt = jnp_dtype(self.cache_dtype)

            def make():
                kv = jnp.zeros((cfg.num_layers, n, self.page_size, cfg.num_kv_heads, 2,
                                cfg.head_dim), dt)
                z = jnp.zeros((s,), jnp.int32)
                table = jnp.full((s, self.pages_per_slot), n // self.shards, jnp.int32)  # none
                return {"cache": {"kv": kv, "lengths": z, "page_table": table},
                        "tokens": z, "active": jnp.zeros((s,), bool), "generated": z, "limit": z,
                        "keys": jnp.zeros((s, 2), jnp.uint32)}

            self._init_state = jax.jit(make, out_shardings=self.state_shardings)
        self.pool = PagePool(self.num_pages, self.page_size, self._slots, self.pages_per_slot,
                             self.shards)
        return self._init_state()

    def _pool(self) -> PagePool:
        if self.pool is None:
            raise RuntimeError("no decode state: call init_decode_state() first")
        return self.pool

    def _with_table(self, state: DecodeState) -> DecodeState:
        """The state with the host page table on the device (when it changed)."""
        pool = self._pool()
        if not pool.dirty:
            return state
        pool.dirty = False
        # From the host copy every process holds alike (the allocator is deterministic), so this
        # also places it on a multi-process mesh.
        host = pool.local_table()  # each device's decode indexes its own pages
        table = jax.make_array_from_callback(host.shape, self.state_shardings["cache"]["page_table"],
                                             lambda idx: host[idx])
        return dict(state, cache=dict(state["cache"], page_table=table))

    # -- prefill: prompts packed into rows, K/V kept in the pool's token-major layout ---------
    def prefill_many(self, params: Params, prompts: Sequence[Sequence[int]]) -> list[Prefix]:
        """Prefixes (in `prompts` order) of several prompts from as few prefill calls as fit: the
        prompts are packed first-fit decreasing into rows of up to `prefill_row_tokens` tokens
        (segment ids keep each prompt's attention to itself, positions restart per prompt), and a
        row is padded only to its own bucket, so the compute follows the prompts' real lengths.
        No host sync."""
        for p in prompts:
            self.bucket_for(len(p))  # checks each prompt against max_prefill_length
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
            n = len(prompts[i])
            r = next((r for r, left in enumerate(room) if left >= n), None)
            if r is None:
                rows.append([])
                room.append(self.prefill_row_tokens)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= n
        out: list[Prefix | None] = [None] * len(prompts)
        for members in rows:
            for i, prefix in zip(members, self._prefill_row(params, [prompts[i] for i in members])):
                out[i] = prefix
        return out

    def _prefill_row(self, params: Params, prompts: Sequence[Sequence[int]]) -> list[Prefix]:
        total = sum(len(p) for p in prompts)
        bucket = next(b for b in self.row_buckets if total <= b)
        tokens = np.full((bucket,), self.pad_token_id, np.int32)
        segments = np.zeros((bucket,), np.int32)
        positions = np.zeros((bucket,), np.int32)
        starts, at = [], 0
        for j, p in enumerate(prompts):
            n = len(p)
            tokens[at:at + n] = np.asarray(p, np.int32)
            segments[at:at + n] = j + 1
            positions[at:at + n] = np.arange(n)
            starts.append(at)
            at += n
        if ("row", bucket) not in self._prefill:
            self._prefill[("row", bucket)] = self._build_row_prefill(bucket)
        row = self._prefill[("row", bucket)](params, jnp.asarray(tokens), jnp.asarray(segments),
                                              jnp.asarray(positions))
        self.prefill_computed_tokens += bucket
        return [{"row": row, "host": PrefixPages(len(p), int(p[-1]), start)}
                for p, start in zip(prompts, starts)]

    def prefix_row_sharding(self, length: int) -> NamedSharding:
        """Sharding of a prefix row [L, length, K, 2, hd]: KV heads like the pool's, the rest
        replicated (every slot shard copies pages out of it)."""
        cfg = self.config
        return named_sharding(self.mesh, ("layers", None, "act_kv_heads", None, "head_dim"),
                              (cfg.num_layers, length, cfg.num_kv_heads, 2, cfg.head_dim),
                              self.rules)

    @property
    def prefix_row_length(self) -> int:
        """Positions of every prefix row: the largest row bucket plus a page, so every page-sized
        slice of a prompt stays inside the row, and one insert program serves every row bucket."""
        return self.row_buckets[-1] + self.page_size

    def _build_row_prefill(self, bucket: int):
        """jit(params, tokens, segment ids, positions [bucket]) -> the row's K/V
        [L, prefix_row_length, K, 2, hd] (computed for `bucket` positions, zero after)."""
        cfg, mesh, rules, matmul = self.config, self.mesh, self.rules, self.decode_layout.matmul
        dt, pad = jnp_dtype(self.cache_dtype), self.prefix_row_length - bucket

        def fn(params, tokens, segments, positions):
            _, kv = decoder_apply(params, cfg, tokens[None], (segments > 0)[None].astype(jnp.int32),
                                  positions[None], mesh=mesh, rules=rules, matmul=matmul,
                                  segment_ids=segments[None], return_kv=True)
            row = jnp.stack([kv["k"][:, 0], kv["v"][:, 0]], axis=-2).astype(dt)  # [L,T,K,2,hd]
            return jnp.pad(row, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))

        rep = self._replicated
        return jax.jit(fn, in_shardings=(self.param_shardings, rep, rep, rep),
                       out_shardings=self.prefix_row_sharding(self.prefix_row_length))

    def prefill(self, params: Params, padded_tokens, true_length: int, *, key=None,
                sampling: SamplingParams = SamplingParams()) -> tuple[Prefix, ResultTokens]:
        """`Engine.prefill` (the dense program draws the first token); the prefix is recast as a
        one-prompt row."""
        prefix, first = super().prefill(params, padded_tokens, true_length, key=key,
                                        sampling=sampling)
        bucket = int(prefix["k"].shape[3])
        if ("to_row", bucket) not in self._prefill:
            pad = self.prefix_row_length - bucket

            def to_row(k, v):  # [L, 1, K, bucket, hd] each -> [L, prefix_row_length, K, 2, hd]
                row = jnp.transpose(jnp.stack([k[:, 0], v[:, 0]], axis=-2), (0, 2, 1, 3, 4))
                return jnp.pad(row, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))

            self._prefill[("to_row", bucket)] = jax.jit(
                to_row, out_shardings=self.prefix_row_sharding(self.prefix_row_length))
        row = self._prefill[("to_row", bucket)](prefix["k"], prefix["v"])
        last = int(np.asarray(padded_tokens)[int(true_length) - 1])
        return {"row": row, "host": PrefixPages(int(true_length), last)}, first

    def prefill_prefix(self, params: Params, padded_tokens, true_length: int) -> Prefix:
        """`Engine.prefill_prefix`: a row of one prompt (`prefill_many` packs several)."""
        self._check_bucket(padded_tokens)
        return self.prefill_many(params, [np.asarray(padded_tokens)[:int(true_length)].tolist()])[0]

    # -- insert --------------------------------------------------------------------------------
    def _shared_count(self, prefix: Prefix) -> int:
        # Pages wholly before the last prompt token, which decoding rewrites (in a private page).
        return (prefix["host"].true_length - 1) // self.page_size

    def _reusable(self, prefix: Prefix, shard: int) -> bool:
        shared = prefix["host"].shared.get(shard)
        return shared is not None and self._pool().alive(*shared)

    def _needs(self, prefix: Prefix, slots: Sequence[int], num_steps: int = 0) -> np.ndarray:
        """Free pages per shard that inserting `prefix` into `slots` takes, plus room for
        `num_steps` tokens each."""
        pool, need = self._pool(), np.zeros((self.shards,), np.int64)
        ahead = pages_for(num_steps, self.page_size) if num_steps else 0
        for d in {int(pool.slot_shard[s]) for s in slots}:
            need[d] = 0 if self._reusable(prefix, d) else self._shared_count(prefix)
        for s in slots:
            need[pool.slot_shard[s]] += 1 + ahead
        return need

    def admissible(self, prefix: Prefix, slots: Sequence[int], num_steps: int) -> int:
        """How many of `slots` (in order) can take samples of `prefix` now with room to decode
        `num_steps` steps, leaving the live slots room for theirs (so admitting preempts nobody)."""
        room = self._room(num_steps)
        n = len(slots)
        while n and (self._needs(prefix, slots[:n], num_steps) > room).any():
            n -= 1
        return n

    def resumable(self, preempted: Preempted, slot: int, num_steps: int) -> bool:
        """Whether `preempted` fits back into `slot` now with room for `num_steps` steps."""
        need = min(pages_for(preempted.length + num_steps, self.page_size), self.pages_per_slot)
        return need <= self._room(num_steps)[self._pool().slot_shard[slot]]

    def _room(self, num_steps: int) -> np.ndarray:
        """Free pages per shard once every live slot has pages for `num_steps` more tokens."""
        pool = self._pool()
        room = np.asarray([pool.free_in(d) for d in range(self.shards)], np.int64)
        for s in np.nonzero(pool.active)[0]:
            room[pool.slot_shard[s]] -= pool.shortfall(
                s, min(pool.lengths[s] + num_steps, self.max_target_length))
        return room

    def insert_many(self, prefix: Prefix, decode_state: DecodeState, slots: Sequence[int], *,
                    keys: Sequence[jax.Array] | jax.Array | None = None,
                    max_new_tokens: int | None = None) -> DecodeState:
        """Inserts one prefix into several slots, sharing its full pages (see the module doc)."""
        n = len(slots)
        if n == 0:
            return decode_state
        self._check_slots(slots)
        pool, meta = self._pool(), prefix["host"]
        for s in slots:  # JetStream semantics: inserting into a busy slot replaces its sample
            pool.release(s)
        n_shared = self._shared_count(prefix)
        need = self._needs(prefix, slots)
        free = np.asarray([pool.free_in(d) for d in range(self.shards)])
        if (need > free).any():
            raise RuntimeError(f"KV pool exhausted: inserting {n} samples takes {need.tolist()} "
                               f"pages per shard, {free.tolist()} are free; check "
                               "Engine.admissible first or raise rollout.kv_pool_tokens")
        slot_arr, key_arr, budget = self._insert_args(slots, keys, max_new_tokens)
        # Page writes (pool page, first row position): a shard's shared prompt pages once, then
        # each sample's own page (the one holding the last prompt token, which decoding rewrites).
        dest, src = [], []
        for s in slots:
            d = int(pool.slot_shard[s])
            if self._reusable(prefix, d):
                shared = list(meta.shared[d][0])
                pool.incref(shared)
            else:  # the first of this shard's slots writes the shard's copy
                shared = pool.alloc(n_shared, d)
                meta.shared[d] = (shared, pool.stamp[shared].tolist())
                dest += shared
                src += [meta.start + j * self.page_size for j in range(n_shared)]
            own = pool.alloc(1, d)
            dest.append(own[0])
            src.append(meta.start + n_shared * self.page_size)
            pool.assign(s, shared + own, meta.true_length - 1)
        writes = 1 << (len(dest) - 1).bit_length()  # powers of two: few compiles
        dest_arr = np.full((writes,), self.num_pages, np.int32)  # out of range: not written
        src_arr = np.zeros((writes,), np.int32)
        dest_arr[:len(dest)], src_arr[:len(src)] = dest, src

        row = prefix["row"]
        sig = (writes, len(slot_arr))  # every row has prefix_row_length positions
        if sig not in self._insert:
            self._insert[sig] = self._build_paged_insert(*sig)
        return self._insert[sig](row, decode_state, jnp.asarray(slot_arr), jnp.asarray(key_arr),
                                 jnp.int32(budget), jnp.asarray(dest_arr), jnp.asarray(src_arr),
                                 jnp.int32(meta.true_length), jnp.int32(meta.last_token))

    def _build_paged_insert(self, writes: int, width: int):
        """jit(row, state, slots, keys, budget, dest pages, row offsets, prompt length, last token):
        copies `writes` page-sized slices of the prefill row into pool pages (cost follows the
        pages written) and starts the slots' samples."""
        rep, p = self._replicated, self.page_size

        def fn(row, state, slots, keys, budget, dest, src, true_length, last_token):
            cache = state["cache"]
            pool = cache["kv"]
            pages = jax.vmap(lambda o: jax.lax.dynamic_slice_in_dim(row, o, p, axis=1))(src)
            pages = jnp.moveaxis(pages, 0, 1).astype(pool.dtype)  # [L, writes, P, K, 2, hd]
            fill = lambda arr, val: arr.at[slots].set(val, mode="drop")  # noqa: E731
            return {
                "cache": {"kv": pool.at[:, dest].set(pages, mode="drop"),
                          "lengths": fill(cache["lengths"], true_length - 1),
                          "page_table": cache["page_table"]},
                **inserted_slot_state(state, slots, last_token, keys, budget),
            }

        return jax.jit(fn, donate_argnums=(1,),
                       in_shardings=(self.prefix_row_sharding(self.prefix_row_length),
                                     self.state_shardings, rep, rep, rep, rep, rep, rep, rep),
                       out_shardings=self.state_shardings)

    # -- page reservation, preemption, resumption ----------------------------------------------
    def reserve(self, decode_state: DecodeState, num_steps: int
                ) -> tuple[DecodeState, list[tuple[int, Preempted]]]:
        """Gives every live slot pages for `num_steps` more tokens, preempting the newest samples
        while the pool is short. Returns (state, [(slot, preempted sample)]); those slots are free."""
        pool = self._pool()
        preempted = []
        while (room := self._room(num_steps)).min() < 0:
            short = int(np.argmin(room))
            live = np.nonzero(pool.active & (pool.slot_shard == short))[0]
            victim = int(live[np.argmax(pool.order[live])])
            decode_state, saved = self.preempt(decode_state, victim)
            preempted.append((victim, saved))
        self._grow(num_steps)
        return decode_state, preempted

    def _grow(self, num_steps: int) -> None:
        pool = self._pool()
        for s in np.nonzero(pool.active)[0]:
            pool.grow(int(s), min(int(pool.lengths[s]) + num_steps, self.max_target_length))

    def preempt(self, decode_state: DecodeState, slot: int) -> tuple[DecodeState, Preempted]:
        """Moves slot `slot`'s sample to the host and frees the slot and its pages."""
        pool = self._pool()
        if self._preempt_fn is None:
            rep = self._replicated

            def fn(state, slot, ids):
                cache = state["cache"]
                take = lambda x: jnp.take(x, ids, axis=1, mode="clip")  # noqa: E731
                saved = {"kv": take(cache["kv"]), "lengths": cache["lengths"][slot]}
                saved.update({k: state[k][slot] for k in ("tokens", "generated", "limit", "keys")})
                return dict(state, active=state["active"].at[slot].set(False)), saved

            self._preempt_fn = jax.jit(fn, donate_argnums=(0,),
                                       in_shardings=(self.state_shardings, rep, rep),
                                       out_shardings=(self.state_shardings, rep))
        decode_state, saved = self._preempt_fn(decode_state, jnp.int32(slot),
                                               jnp.asarray(pool.table[slot]))
        saved = {k: np.asarray(v) for k, v in tree_to_host(saved).items()}
        length, order = int(pool.lengths[slot]), int(pool.order[slot])
        pool.release(slot)
        self.preemptions += 1
        return decode_state, Preempted(saved, length, order)

    def resume(self, decode_state: DecodeState, slot: int, preempted: Preempted) -> DecodeState:
        """Puts a preempted sample back into slot `slot` (its pages into fresh pool pages)."""
        pool = self._pool()
        pool.release(slot)
        n = pages_for(preempted.length, self.page_size)
        pages = pool.alloc(n, int(pool.slot_shard[slot]))  # raises if short: check resumable
        ids = np.full((self.pages_per_slot,), self.num_pages, np.int32)
        ids[:n] = pages
        if self._resume_fn is None:
            rep = self._replicated

            def fn(state, slot, ids, saved):
                cache = state["cache"]
                put = lambda pool, x: pool.at[:, ids].set(x.astype(pool.dtype), mode="drop")  # noqa
                set_ = lambda arr, val: arr.at[slot].set(val)  # noqa: E731
                return {
                    "cache": {"kv": put(cache["kv"], saved["kv"]),
                              "lengths": set_(cache["lengths"], saved["lengths"]),
                              "page_table": cache["page_table"]},
                    "tokens": set_(state["tokens"], saved["tokens"]),
                    "active": set_(state["active"], True),
                    "generated": set_(state["generated"], saved["generated"]),
                    "limit": set_(state["limit"], saved["limit"]),
                    "keys": set_(state["keys"], saved["keys"]),
                }

            self._resume_fn = jax.jit(fn, donate_argnums=(0,),
                                      in_shardings=(self.state_shardings, rep, rep, rep),
                                      out_shardings=self.state_shardings)
        saved = {k: jnp.asarray(v) for k, v in preempted.arrays.items()}
        decode_state = self._resume_fn(decode_state, jnp.int32(slot), jnp.asarray(ids), saved)
        pool.assign(slot, pages, preempted.length)
        pool.order[slot] = preempted.order
        return decode_state

    # -- generate ------------------------------------------------------------------------------
    def generate(self, params: Params, decode_state: DecodeState, *, num_steps: int = 1,
                 sampling: SamplingParams = SamplingParams()) -> tuple[DecodeState, ResultTokens]:
        """`Engine.generate`; finished samples give their pages back. Live slots must have room for
        `num_steps` tokens (`reserve` makes it; without it a short pool raises)."""
        state, out = self.generate_async(params, decode_state, num_steps=num_steps,
                                         sampling=sampling, _track=False)
        out = tree_to_host(out)
        res = ResultTokens(**{k: np.asarray(v) for k, v in out.items()})
        pool = self._pool()
        pool.lengths += res.valid.sum(axis=0)
        for s in np.nonzero(res.done.any(axis=0))[0]:
            pool.release(int(s))
        return state, res

    def generate_async(self, params: Params, decode_state: DecodeState, *, num_steps: int = 1,
                       sampling: SamplingParams = SamplingParams(), _track: bool = True):
        """`Engine.generate_async`. Without the results the host cannot tell which samples ended:
        their pages return when their slots are inserted into again."""
        pool = self._pool()
        self._grow(num_steps)  # raises if the pool is short: call reserve first
        state = self._with_table(decode_state)
        state, out = self.generate_program(num_steps, sampling)(params, state)
        if _track:  # an upper bound of each live slot's length, enough to reserve pages by
            pool.lengths[pool.active] += num_steps
        return state, out

    def kv_stats(self) -> dict[str, int]:
        """Pool size, pages in use and the most ever in use, preemptions so far."""
        pool = self._pool()
        return {"kv_pages": self.num_pages, "kv_pages_used": pool.used_pages,
                "kv_peak_pages": pool.peak_pages, "preemptions": self.preemptions}


def build_engine(model_config: ModelConfig, *, kv_cache: str = "dense", kv_pool_tokens: int = 0,
                 kv_page_size: int = DEFAULT_PAGE_SIZE,
                 prefill_row_tokens: int = DEFAULT_PREFILL_ROW_TOKENS, **kwargs: Any) -> Engine:
    """An `Engine` (dense KV cache) or a `PagedEngine`, by `kv_cache` (one of KV_CACHE_CHOICES);
    `prefill_row_tokens` is the paged engine's packed prefill row (the dense one prefills per
    prompt)."""
    if kv_cache == "dense":
        return Engine(model_config, **kwargs)
    if kv_cache == "paged":
        return PagedEngine(model_config, kv_pool_tokens=kv_pool_tokens, kv_page_size=kv_page_size,
                           prefill_row_tokens=prefill_row_tokens, **kwargs)
    raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {list(KV_CACHE_CHOICES)}")
