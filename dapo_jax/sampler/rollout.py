"""Continuous-batching rollout driver over the JetStream-style `Engine`.

Requests (prompt, n samples) queue up; each prompt is prefilled once and inserted into n decode
slots; slots freed by finished samples are refilled from the queue; several decode steps run per
host round-trip. Results come back in request order with the per-token log-probs the trainer needs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from dapo_jax.sampler.engine import Engine
from dapo_jax.sampler.sampling import SamplingParams


@dataclasses.dataclass
class RolloutRequest:
    """One prompt (token ids) to be sampled `n` times."""

    prompt: Sequence[int]
    n: int = 1
    max_new_tokens: int | None = None


@dataclasses.dataclass
class Sample:
    """One generated response."""

    tokens: np.ndarray  # [L] int32, including the stop token when finish_reason == "eos"
    # [L] float32 log-probs under the policy at the sampling temperature, log_softmax(logits / T)
    # without top-k / top-p: what the trainer's old log-probs recompute (T = 1 when greedy).
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray  # [L] float32 log-probs under the sampling distribution
    finish_reason: str  # "eos" | "length"
    text: str | None = None

    @property
    def length(self) -> int:
        """Number of generated tokens."""
        return int(self.tokens.shape[0])


@dataclasses.dataclass
class RolloutResult:
    """Samples per request (request order, then sample order) and timing counters.

    `stats`: prefill_tokens, prefill_computed_tokens (with the padding the engine computed),
    decode_tokens, decode_steps, wall_s, tokens_per_s, decode_tokens_per_s,
    (paged KV cache) preemptions, kv_pages, kv_pages_used, kv_peak_pages, and seconds per phase (prefill_s, insert_s, decode_s). Prefills and inserts are dispatched without
    waiting; one wait per refill round, before the next decode, lets them finish, so decode_s holds
    decode steps only and prefill_s + insert_s the rest (the split between those two is the host's
    view: an insert can wait for its prompt's prefill).
    """

    samples: list[list[Sample]]
    stats: dict[str, float]


class RolloutDriver:
    """Generates n samples per prompt with continuous batching over the engine's decode slots."""

    def __init__(self, engine: Engine, params: Any = None, *, steps_per_sync: int = 8,
                 tokenizer: Any = None, progress: bool | None = None,
                 sampling: SamplingParams = SamplingParams()):
        """`sampling` is the default of `generate(sampling=None)`."""
        if steps_per_sync < 1:
            raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
        self.engine = engine
        self.steps_per_sync = int(steps_per_sync)
        self.tokenizer = tokenizer
        self.progress = progress
        self.sampling = sampling
        self.params = None if params is None else engine.load_params(params)
        self._state = None

    def update_params(self, params: Any) -> None:
        """Swaps in new weights (any layout) between RL steps; shapes are unchanged: no recompile."""
        self.params = None  # drop the old copy before making the new one
        self.params = self.engine.load_params(params)

    def release(self) -> None:
        """Frees the sampler's weights and KV cache (e.g. during the optimizer update)."""
        self.params = None
        self._state = None

    def generate(self, requests: Sequence[RolloutRequest], *, seed: int = 0,
                 sampling: SamplingParams | None = None, desc: str = "rollout") -> RolloutResult:
        """Samples every request; deterministic for a given seed (keys depend on request/sample)."""
        if self.params is None:
            raise RuntimeError("RolloutDriver has no weights: pass params= or call update_params()")
        eng = self.engine
        sampling = self.sampling if sampling is None else sampling
        for i, r in enumerate(requests):
            if r.n < 1:
                raise ValueError(f"request {i}: n must be >= 1, got {r.n}")
            if len(r.prompt) > eng.max_prefill_length:
                raise ValueError(f"request {i}: prompt has {len(r.prompt)} tokens, more than the "
                                 f"engine's max_prefill_length {eng.max_prefill_length}")
            if len(r.prompt) == 0:
                raise ValueError(f"request {i}: empty prompt")
        if self._state is None:
            self._state = eng.init_decode_state()
        state = self._state

        total = sum(r.n for r in requests)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        bar = tqdm.tqdm(total=total, desc=desc, disable=not show, unit="seq", leave=False)
        stats = collections.Counter()
        t_start = time.perf_counter()
        results: list[list[Sample | None]] = [[None] * r.n for r in requests]
        buffers: dict[int, tuple[int, int, list, list, list]] = {}
        free = collections.deque(range(eng.max_concurrent_decodes))
        queue = collections.deque(range(len(requests)))
        next_sample = [0] * len(requests)
        prefix = None
        prefix_req = -1
        ready: dict[int, Any] = {}  # prefilled prompts not yet taken from the queue's front
        computed0 = eng.prefill_computed_tokens
        all_keys = eng.sample_keys_many(seed, [r.n for r in requests])
        pool = concurrent.futures.ThreadPoolExecutor(1) if self.tokenizer is not None else None
        texts: dict[tuple[int, int], concurrent.futures.Future] = {}

        resumes: collections.deque = collections.deque()  # (buffer, preempted sample), FIFO
        steps = self.steps_per_sync
        while queue or buffers or resumes:
            refilled = False
            # Preempted samples go back first (a paged cache's pool was short; a dense one never is).
            # With nothing decoding the whole pool is free, and one sample always fits in it.
            while free and resumes and (eng.resumable(resumes[0][1], free[0], steps)
                                        or not buffers):
                buf, pre = resumes.popleft()
                s = free.popleft()
                t0 = time.perf_counter()
                state = eng.resume(state, s, pre)
                stats["insert_s"] += time.perf_counter() - t0
                buffers[s] = buf
                refilled = True
            # Fill free slots from the queue (one prefill per prompt, shared by its n samples).
            while free and queue and not resumes:
                r = queue[0]
                req = requests[r]
                if prefix_req != r:
                    if r not in ready:
                        # Prefill in one call the prompts the free slots take, and more while
                        # the engine's packed row has room (full rows: few row shapes, few
                        # compiles).
                        t0 = time.perf_counter()
                        ahead, seats, tokens = [], len(free), 0
                        for i in queue:
                            n_tokens = len(requests[i].prompt)
                            if seats <= 0 and (tokens + n_tokens > eng.prefill_batch_tokens
                                               or i in ready):
                                break
                            if i not in ready:
                                ahead.append(i)
                                tokens += n_tokens
                            seats -= requests[i].n - next_sample[i]
                        ready.update(zip(ahead, eng.prefill_many(
                            self.params, [requests[i].prompt for i in ahead])))
                        stats["prefill_tokens"] += sum(len(requests[i].prompt) for i in ahead)
                        stats["prefill_s"] += time.perf_counter() - t0
                    prefix = ready.pop(r)
                    prefix_req = r
                    keys = all_keys[r]
                want = min(len(free), req.n - next_sample[r])
                k = eng.admissible(prefix, [free[i] for i in range(want)], steps)
                if k == 0 and buffers:  # the KV pool is full: wait for samples to finish
                    break
                k = max(k, 1)
                refilled = True
                slots = [free.popleft() for _ in range(k)]
                idx = list(range(next_sample[r], next_sample[r] + k))
                budget = req.max_new_tokens or eng.max_target_length
                t0 = time.perf_counter()
                state = eng.insert_many(prefix, state, slots, keys=keys[idx], max_new_tokens=budget)
                stats["insert_s"] += time.perf_counter() - t0
                for s, j in zip(slots, idx):
                    buffers[s] = (r, j, [], [], [])
                next_sample[r] += k
                if next_sample[r] == req.n:
                    queue.popleft()
            if refilled:  # one wait per round keeps decode_s free of prefill time
                t0 = time.perf_counter()
                jax.block_until_ready(state)
                stats["prefill_s"] += time.perf_counter() - t0
            # Pages for the next steps of every live sample; a short pool preempts the newest.
            state, preempted = eng.reserve(state, steps)
            for s, pre in preempted:
                resumes.append((buffers.pop(s), pre))
                free.append(s)
                stats["preemptions"] += 1
            # Decode several steps per host round-trip.
            t0 = time.perf_counter()
            state, res = eng.generate(self.params, state, num_steps=self.steps_per_sync,
                                      sampling=sampling)
            stats["decode_s"] += time.perf_counter() - t0
            stats["decode_steps"] += self.steps_per_sync
            for t in range(res.tokens.shape[0]):
                for s in np.nonzero(res.valid[t])[0]:
                    r, j, toks, lps, slps = buffers[s]
                    toks.append(res.tokens[t, s])
                    lps.append(res.logprobs[t, s])
                    slps.append(res.sampling_logprobs[t, s])
                    if res.done[t, s]:
                        sample = Sample(np.asarray(toks, np.int32), np.asarray(lps, np.float32),
                                        np.asarray(slps, np.float32),
                                        "eos" if res.stop[t, s] else "length")
                        results[r][j] = sample
                        stats["decode_tokens"] += len(toks)
                        if pool is not None:
                            texts[(r, j)] = pool.submit(self.tokenizer.decode, sample.tokens,
                                                        skip_special_tokens=True)
                        del buffers[s]
                        free.append(s)
                        bar.update(1)
        self._state = state
        bar.close()
        if pool is not None:
            for (r, j), fut in texts.items():
                results[r][j].text = fut.result()
            pool.shutdown()
        stats["prefill_computed_tokens"] = eng.prefill_computed_tokens - computed0
        stats.update(eng.kv_stats())
        stats["wall_s"] = time.perf_counter() - t_start
        stats["decode_tokens_per_s"] = stats["decode_tokens"] / max(stats["decode_s"], 1e-9)
        stats["tokens_per_s"] = stats["decode_tokens"] / max(stats["wall_s"], 1e-9)
        return RolloutResult(samples=results, stats=dict(stats))


