"""A JetStream-API decode engine: prefill -> insert into a decode slot -> generate for all slots.

Method names and semantics follow JetStream's `engine_api.Engine` (load_params, init_decode_state,
prefill, insert, generate, max_concurrent_decodes, max_prefill_length, samples_per_slot) without
depending on that package. The KV cache is preallocated for `max_concurrent_decodes` slots and
donated through every jitted step, so decoding never copies it.

Each slot carries its own PRNG key, derived from (seed, request id, sample index) by the caller and
folded with the slot's generated-token count each step, so a sample's tokens do not depend on which
slot it landed in or on what else is decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dapo_jax.runtime.host_transfer import tree_to_host
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.qwen2 import Params, decoder_apply, jnp_dtype
from dapo_jax.models.sharding import DEFAULT_RULES, make_mesh, mesh_platform, named_sharding
from dapo_jax.sampler.decode_layout import DecodeLayout, resolve_decode_layout
from dapo_jax.sampler.sampling import SamplingParams, sample_tokens

# Sampling layout: weights tensor-parallel over heads / mlp / vocab and replicated across the other
# axes (no FSDP gathers per decode step); decode slots and their KV cache split over (data, fsdp).
SAMPLING_RULES: dict[str, Any] = dict(DEFAULT_RULES, embed=None)

Prefix = dict[str, jax.Array]
DecodeState = dict[str, Any]


@dataclasses.dataclass
class ResultTokens:
    """Per-slot output of `generate` for `num_steps` steps (arrays shaped [num_steps, slots]).

    `valid` marks slots that produced a token at that step; `done` marks the step a slot finished;
    `stop` whether it finished on a stop token (else on the length limit); `lengths` is the number of
    tokens the slot has generated so far.
    """

    tokens: np.ndarray
    valid: np.ndarray
    done: np.ndarray
    stop: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray

    def get_result_at_slot(self, slot: int) -> dict[str, np.ndarray]:
        """The slot's column of every field (JetStream's accessor name)."""
        return {f.name: getattr(self, f.name)[:, slot] for f in dataclasses.fields(self)}


@jax.jit
def _sample_keys(base, request_ids, sample_ids):
    keys = jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(base, r), i))(request_ids,
                                                                                   sample_ids)
    return jax.random.key_data(keys)


def prefill_buckets(max_prefill_length: int, min_bucket: int = 16) -> list[int]:
    """Powers of two from `min_bucket` up to (and including) `max_prefill_length`."""
    buckets = []
    b = min(min_bucket, max_prefill_length)
    while b < max_prefill_length:
        buckets.append(b)
        b *= 2
    buckets.append(max_prefill_length)
    return buckets


def inserted_slot_state(state: DecodeState, slots: jax.Array, last_token: jax.Array,
                        keys: jax.Array, budget: jax.Array) -> dict[str, jax.Array]:
    """The per-slot decode fields of freshly inserted samples (every engine's insert sets these;
    out-of-range padding slots are dropped)."""
    fill = lambda arr, val: arr.at[slots].set(val, mode="drop")  # noqa: E731
    return {"tokens": fill(state["tokens"], last_token), "active": fill(state["active"], True),
            "generated": fill(state["generated"], 0), "limit": fill(state["limit"], budget),
            "keys": state["keys"].at[slots].set(keys, mode="drop")}


class Engine:
    """Slot-based continuous-batching decode engine for the Qwen2 policy.

    `decode_layout` ("auto", a name in `decode_layout.DECODE_LAYOUTS`, or a `DecodeLayout`) is how the
    engine holds the weights and multiplies by them; "auto" picks by the mesh's platform.
    This engine's KV cache is dense (every slot reserves max_target_length positions and every step
    reads them all); `paged_engine.PagedEngine` is the paged one.
    """

    kv_cache = "dense"

    def __init__(self, model_config: ModelConfig, *, max_concurrent_decodes: int,
                 max_prefill_length: int, max_target_length: int, stop_token_ids: Sequence[int],
                 pad_token_id: int = 0,
                 mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                 cache_dtype: str | None = None, min_prefill_bucket: int = 16,
                 decode_layout: str | DecodeLayout = "auto"):
        if max_prefill_length >= max_target_length:
            raise ValueError(f"max_target_length ({max_target_length}) must exceed max_prefill_length "
                             f"({max_prefill_length}): it is the prompt plus the generated tokens")
        if not stop_token_ids:
            raise ValueError("stop_token_ids is empty: give at least the EOS token id")
        self.config = model_config
        self.mesh = mesh if mesh is not None else make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                            devices=jax.devices()[:1])
        self.rules = dict(SAMPLING_RULES if rules is None else rules)
        self._slots = int(max_concurrent_decodes)
        self._max_prefill = int(max_prefill_length)
        self.max_target_length = int(max_target_length)
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.cache_dtype = cache_dtype or model_config.dtype
        self.buckets = prefill_buckets(self._max_prefill, min_prefill_bucket)
        self.decode_layout = resolve_decode_layout(decode_layout, mesh_platform(self.mesh))
        self.param_shardings = self.decode_layout.shardings(model_config, self.mesh, self.rules)
        self.state_shardings = self._state_shardings()
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._cast = None
        self._init_state = None
        self._prefill = {}
        self.prefill_computed_tokens = 0  # positions prefilled, bucket padding included
        self._insert = {}
        self._generate = {}

    # -- JetStream properties ------------------------------------------------------------------
    @property
    def max_concurrent_decodes(self) -> int:
        """Number of decode slots."""
        return self._slots

    @property
    def max_prefill_length(self) -> int:
        """Longest prompt `prefill` accepts."""
        return self._max_prefill

    @property
    def samples_per_slot(self) -> int:
        """Sequences decoded per slot (always 1: n samples of a prompt occupy n slots)."""
        return 1

    # -- shardings -----------------------------------------------------------------------------
    def _state_shardings(self) -> DecodeState:
        cfg, s, m = self.config, self._slots, self.max_target_length
        kv_shape = (cfg.num_layers, s, cfg.num_kv_heads, m, cfg.head_dim)
        kv = named_sharding(self.mesh, ("layers", "cache_batch", "act_kv_heads", "cache_seq",
                                        "head_dim"), kv_shape, self.rules)
        vec = named_sharding(self.mesh, ("cache_batch",), (s,), self.rules)
        keys = named_sharding(self.mesh, ("cache_batch", None), (s, 2), self.rules)
        return {"cache": {"k": kv, "v": kv, "lengths": vec}, "tokens": vec, "active": vec,
                "generated": vec, "limit": vec, "keys": keys}

    # -- JetStream methods ---------------------------------------------------------------------
    def load_params(self, params: Params | Any) -> Params:
        """Places parameters (a dict or an NNX model, training layout) in the sampling layout.

        The sampling layout (`self.decode_layout`) stores floating weights in the compute dtype
        (`model_config.dtype`): decoding casts to it anyway, so float32 training weights cost half
        the memory in the sampler under bf16 compute. Parameters already in the sampling layout (an
        earlier result) are placed as they are.
        """
        if hasattr(params, "params") and callable(params.params):
            params = params.params()
        layout, cfg = self.decode_layout, self.config
        if layout.holds(params, cfg):
            return jax.device_put(params, self.param_shardings)
        layout.check_input(params)
        if self._cast is None:
            convert = lambda p: layout.convert(p, cfg)  # noqa: E731
            # On the engine's own devices: convert and reshard in one compiled program, so every
            # process of a multi-host job runs the same collectives in the same order.
            self._cast_to_layout = jax.jit(convert, out_shardings=self.param_shardings)
            # Weights elsewhere (host, another mesh): convert where they are, then device_put.
            self._cast = jax.jit(convert)
        mesh_devices = set(self.mesh.devices.flat)
        if all(isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices
               for x in jax.tree.leaves(params)):
            return self._cast_to_layout(params)
        return jax.device_put(self._cast(params), self.param_shardings)

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the parameters as `load_params` lays them out (for AOT compiles)."""
        return self.decode_layout.abstract(self.config, self.param_shardings)

    def init_decode_state(self) -> DecodeState:
        """An empty decode state: preallocated KV cache, every slot free."""
        # Built once per engine: the trainer frees the state before every update and makes a new one
        # at the next rollout, and a new jit object would trace and compile the program again.
        if self._init_state is None:
            cfg, s, m = self.config, self._slots, self.max_target_length
            dt = jnp_dtype(self.cache_dtype)

            def make():
                kv = jnp.zeros((cfg.num_layers, s, cfg.num_kv_heads, m, cfg.head_dim), dt)
                z = jnp.zeros((s,), jnp.int32)
                return {"cache": {"k": kv, "v": kv, "lengths": z}, "tokens": z,
                        "active": jnp.zeros((s,), bool), "generated": z, "limit": z,
                        "keys": jnp.zeros((s, 2), jnp.uint32)}

            self._init_state = jax.jit(make, out_shardings=self.state_shardings)
        return self._init_state()

    def bucket_for(self, length: int) -> int:
        """The prefill bucket (padded length) for a prompt of `length` tokens."""
        if length < 1:
            raise ValueError("cannot prefill an empty prompt")
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"prompt of {length} tokens exceeds max_prefill_length "
                         f"{self._max_prefill}; truncate prompts in the data pipeline or raise it")

    def pad_tokens(self, tokens: Sequence[int]) -> tuple[np.ndarray, int]:
        """Right-pads a prompt to its bucket. Returns (padded_tokens, true_length)."""
        n = len(tokens)
        padded = np.full((self.bucket_for(n),), self.pad_token_id, np.int32)
        padded[:n] = np.asarray(tokens, np.int32)
        return padded, n

    def prefill(self, params: Params, padded_tokens: jax.Array | np.ndarray, true_length: int,
                *, key: jax.Array | None = None, sampling: SamplingParams = SamplingParams()
                ) -> tuple[Prefix, ResultTokens]:
        """Runs the prompt through the model. Returns (prefix, first-token result).

        The prefix holds the prompt's KV cache; `insert` resumes each slot from the prompt's last
        token, so the n slots that share one prefix draw their first tokens independently.
        """
        bucket = self._check_bucket(padded_tokens)
        # Keyed by everything the program bakes in: the first token is drawn with `sampling`.
        sig = ("first", bucket, sampling)
        if sig not in self._prefill:
            self._prefill[sig] = self._build_prefill(bucket, sampling)
        key = jax.random.key_data(key) if key is not None else jnp.zeros((2,), jnp.uint32)
        self.prefill_computed_tokens += bucket
        prefix, first = self._prefill[sig](params, jnp.asarray(padded_tokens, jnp.int32),
                                           jnp.int32(true_length), key)
        first = tree_to_host(first)
        one = lambda x: np.asarray(x).reshape(1, 1)  # noqa: E731
        result = ResultTokens(tokens=one(first["token"]), valid=np.ones((1, 1), bool),
                              done=one(np.isin(first["token"], self.stop_token_ids)),
                              stop=one(np.isin(first["token"], self.stop_token_ids)),
                              lengths=np.ones((1, 1), np.int32), logprobs=one(first["logprob"]),
                              sampling_logprobs=one(first["sampling_logprob"]))
        return prefix, result

    def _check_bucket(self, padded_tokens) -> int:
        bucket = int(np.shape(padded_tokens)[0])
        if bucket not in self.buckets:
            raise ValueError(f"padded_tokens length {bucket} is not a prefill bucket {self.buckets}; "
                             "use Engine.pad_tokens")
        return bucket

    def prefill_prefix(self, params: Params, padded_tokens: jax.Array | np.ndarray,
                       true_length: int) -> Prefix:
        """`prefill` without the first token: the prefix only, and no host sync.

        `insert` resumes each slot from the prompt's last token, so a driver that inserts every
        prefix needs no first token; skipping its sampling and the device-to-host copy lets the next
        prompt's prefill be dispatched while this one runs.
        """
        bucket = self._check_bucket(padded_tokens)
        key = ("prefix", bucket)
        if key not in self._prefill:
            self._prefill[key] = self._build_prefill(bucket, None)
        self.prefill_computed_tokens += bucket
        return self._prefill[key](params, jnp.asarray(padded_tokens, jnp.int32),
                                  jnp.int32(true_length))

    # Prompt tokens a driver may prefill ahead of free slots in one `prefill_many` call (0: only
    # what the free slots take; the paged engine fills its packed rows).
    prefill_batch_tokens = 0

    def prefill_many(self, params: Params, prompts: Sequence[Sequence[int]]) -> list[Prefix]:
        """Prefixes of several prompts (token lists): here one `prefill_prefix` each, padded to its
        bucket; the paged engine packs them into shared rows."""
        return [self.prefill_prefix(params, *self.pad_tokens(p)) for p in prompts]

    def _build_prefill(self, bucket: int, sp: SamplingParams | None):
        """The prefill program; with sampling params `sp` it also draws the first token."""
        first_token = sp is not None
        cfg, mesh, rules = self.config, self.mesh, self.rules
        matmul = self.decode_layout.matmul
        kv_sh = named_sharding(mesh, ("layers", None, "act_kv_heads", None, "head_dim"),
                               (cfg.num_layers, 1, cfg.num_kv_heads, bucket, cfg.head_dim), rules)
        rep = NamedSharding(mesh, PartitionSpec())

        def fn(params, tokens, true_length, key):
            dt = jnp_dtype(self.cache_dtype)
            kv = jnp.zeros((cfg.num_layers, 1, cfg.num_kv_heads, bucket, cfg.head_dim), dt)
            cache = {"k": kv, "v": kv, "lengths": jnp.zeros((1,), jnp.int32)}
            mask = (jnp.arange(bucket) < true_length).astype(jnp.int32)[None]
            hidden, cache = decoder_apply(params, cfg, tokens[None], mask, cache=cache, mesh=mesh,
                                          rules=rules, matmul=matmul)
            prefix = {"k": cache["k"], "v": cache["v"], "true_length": true_length,
                      "last_token": tokens[true_length - 1]}
            if not first_token:
                return prefix
            last = jax.lax.dynamic_index_in_dim(hidden[0], true_length - 1, keepdims=False)
            tok, slp, plp = self._sample(params, last[None], jax.random.wrap_key_data(key)[None], sp)
            return prefix, {"token": tok[0], "logprob": plp[0], "sampling_logprob": slp[0]}

        prefix_sh = {"k": kv_sh, "v": kv_sh, "true_length": rep, "last_token": rep}
        if not first_token:
            return jax.jit(lambda params, tokens, true_length: fn(params, tokens, true_length, None),
                           in_shardings=(self.param_shardings, rep, rep), out_shardings=prefix_sh)
        return jax.jit(fn, in_shardings=(self.param_shardings, rep, rep, rep),
                       out_shardings=(prefix_sh, {"token": rep, "logprob": rep,
                                                  "sampling_logprob": rep}))

    def _sample(self, params: Params, hidden: jax.Array, keys: jax.Array, sp: SamplingParams):
        """(tokens, sampling log-probs, policy log-probs) for hidden states [B, D] (traced)."""
        logits, vocab_axis = self.decode_layout.logits(params, self.config, hidden)
        return sample_tokens(logits, keys, sp, vocab_axis=vocab_axis)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int, *,
               key: jax.Array | None = None, max_new_tokens: int | None = None) -> DecodeState:
        """Puts a prefilled prompt into decode slot `slot` (JetStream semantics)."""
        return self.insert_many(prefix, decode_state, [slot],
                                keys=None if key is None else [key], max_new_tokens=max_new_tokens)

    def _check_slots(self, slots: Sequence[int]) -> None:
        if any(not 0 <= s < self._slots for s in slots):
            raise ValueError(f"slots {list(slots)} out of range [0, {self._slots})")

    def _insert_args(self, slots: Sequence[int], keys: Sequence[jax.Array] | jax.Array | None,
                     max_new_tokens: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        """(slot indices, key data, token budget) of an insert, padded to a power-of-two width so
        compiles stay few; padding slots are out of range, so their writes are dropped."""
        n = len(slots)
        width = 1 << (n - 1).bit_length()
        slot_arr = np.full((width,), self._slots, np.int32)
        slot_arr[:n] = slots
        key_arr = np.zeros((width, 2), np.uint32)
        if keys is not None:
            kd = np.asarray(jax.device_get(jax.random.key_data(jnp.stack(list(keys)))
                                           if not isinstance(keys, np.ndarray) else keys))
            key_arr[:n] = kd.reshape(n, 2)
        budget = self.max_target_length if max_new_tokens is None else int(max_new_tokens)
        return slot_arr, key_arr, budget

    def insert_many(self, prefix: Prefix, decode_state: DecodeState, slots: Sequence[int], *,
                    keys: Sequence[jax.Array] | jax.Array | None = None,
                    max_new_tokens: int | None = None) -> DecodeState:
        """Inserts one prefix into several slots at once (the n samples of one prompt)."""
        if not slots:
            return decode_state
        self._check_slots(slots)
        slot_arr, key_arr, budget = self._insert_args(slots, keys, max_new_tokens)
        width = len(slot_arr)
        bucket = int(prefix["k"].shape[3])
        sig = (bucket, width)
        if sig not in self._insert:
            self._insert[sig] = self._build_insert(bucket, width)
        return self._insert[sig](prefix, decode_state, jnp.asarray(slot_arr), jnp.asarray(key_arr),
                                 jnp.int32(budget))

    def _build_insert(self, bucket: int, width: int):
        rep = self._replicated

        def fn(prefix, state, slots, keys, budget):
            cache = state["cache"]
            k = cache["k"].at[:, slots, :, :bucket].set(
                jnp.broadcast_to(prefix["k"], (prefix["k"].shape[0], width) + prefix["k"].shape[2:]),
                mode="drop")
            v = cache["v"].at[:, slots, :, :bucket].set(
                jnp.broadcast_to(prefix["v"], (prefix["v"].shape[0], width) + prefix["v"].shape[2:]),
                mode="drop")
            start = prefix["true_length"] - 1  # resume from the last prompt token
            fill = lambda arr, val: arr.at[slots].set(val, mode="drop")  # noqa: E731
            return {"cache": {"k": k, "v": v, "lengths": fill(cache["lengths"], start)},
                    **inserted_slot_state(state, slots, prefix["last_token"], keys, budget)}

        return jax.jit(fn, donate_argnums=(1,),
                       in_shardings=(None, self.state_shardings, rep, rep, rep),
                       out_shardings=self.state_shardings)

    def generate(self, params: Params, decode_state: DecodeState, *, num_steps: int = 1,
                 sampling: SamplingParams = SamplingParams()) -> tuple[DecodeState, ResultTokens]:
        """Advances every active slot by `num_steps` tokens drawn with `sampling`, in one call."""
        state, out = self.generate_async(params, decode_state, num_steps=num_steps,
                                         sampling=sampling)
        out = tree_to_host(out)
        return state, ResultTokens(**{k: np.asarray(v) for k, v in out.items()})

    def generate_async(self, params: Params, decode_state: DecodeState, *, num_steps: int = 1,
                       sampling: SamplingParams = SamplingParams()):
        """Like `generate` but returns device arrays (no host sync), for pipelined drivers."""
        return self.generate_program(num_steps, sampling)(params, decode_state)

    def generate_program(self, num_steps: int, sampling: SamplingParams):
        """The jitted decode program jit(params, state) -> (state, results) for `num_steps` steps
        drawn with `sampling`; built once per (num_steps, sampling). `.lower()` it with abstract
        inputs (`abstract_params()`, the state's shapes) to plan memory without running it."""
        sig = (int(num_steps), sampling)
        if sig not in self._generate:
            self._generate[sig] = self._build_generate(int(num_steps), sampling)
        return self._generate[sig]

    def _build_generate(self, num_steps: int, sp: SamplingParams):
        cfg, mesh, rules, matmul = self.config, self.mesh, self.rules, self.decode_layout.matmul
        stop_ids = jnp.asarray(self.stop_token_ids, jnp.int32)
        max_len = self.max_target_length

        def step(params, state):
            active = state["active"]
            hidden, cache = decoder_apply(params, cfg, state["tokens"][:, None],
                                          active[:, None].astype(jnp.int32), cache=state["cache"],
                                          mesh=mesh, rules=rules, matmul=matmul)
            keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state["keys"]),
                                                state["generated"])
            tok, slp, plp = self._sample(params, hidden[:, 0], keys, sp)
            generated = state["generated"] + active.astype(jnp.int32)
            stop = jnp.isin(tok, stop_ids)
            done = active & (stop | (generated >= state["limit"]) | (cache["lengths"] >= max_len))
            out = {"tokens": tok, "valid": active, "done": done, "stop": stop & active,
                   "lengths": generated, "logprobs": plp, "sampling_logprobs": slp}
            new_state = {"cache": cache, "tokens": jnp.where(active, tok, state["tokens"]),
                         "active": active & ~done, "generated": generated,
                         "limit": state["limit"], "keys": state["keys"]}
            return new_state, out

        def fn(params, state):
            return jax.lax.scan(lambda s, _: step(params, s), state, None, length=num_steps)

        rep = self._replicated
        out_sh = {k: rep for k in ("tokens", "valid", "done", "stop", "lengths", "logprobs",
                                   "sampling_logprobs")}
        return jax.jit(fn, donate_argnums=(1,),
                       in_shardings=(self.param_shardings, self.state_shardings),
                       out_shardings=(self.state_shardings, out_sh))

    # -- KV-memory hooks the driver calls (a dense cache always has room) -----------------------
    def admissible(self, prefix: Prefix, slots: Sequence[int], num_steps: int) -> int:
        """How many of `slots` (in order) can take samples of `prefix` now (dense: all)."""
        return len(slots)

    def resumable(self, preempted: Any, slot: int, num_steps: int) -> bool:
        """Whether a preempted sample fits back now (a dense cache never preempts)."""
        return True

    def reserve(self, decode_state: DecodeState, num_steps: int
                ) -> tuple[DecodeState, list[tuple[int, Any]]]:
        """Makes room for `num_steps` steps of every live slot; (state, preempted): none here."""
        return decode_state, []

    def resume(self, decode_state: DecodeState, slot: int, preempted: Any) -> DecodeState:
        """Puts a preempted sample back: never needed, a dense cache never preempts (`reserve`
        returns none), so a sample here came from another engine."""
        raise RuntimeError(f"slot {slot}: resume() on a dense-KV-cache Engine, which never "
                           "preempts; resume a preempted sample on the PagedEngine that made it")

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes of the K and V cache (all slots together)."""
        cfg = self.config
        return (2 * cfg.num_layers * self._slots * cfg.num_kv_heads * self.max_target_length
                * cfg.head_dim * jnp.dtype(jnp_dtype(self.cache_dtype)).itemsize)

    def kv_stats(self) -> dict[str, int]:
        """KV-memory counters for rollout stats (none for a dense cache)."""
        return {}

    @staticmethod
    def sample_keys(seed: int, request_id: int, num_samples: int) -> np.ndarray:
        """Raw PRNG keys [n, 2] of a request's samples: functions of (seed, request, index) only."""
        return Engine.sample_keys_many(seed, [num_samples], first_request_id=request_id)[0]

    @staticmethod
    def sample_keys_many(seed: int, num_samples: Sequence[int], first_request_id: int = 0
                         ) -> list[np.ndarray]:
        """`sample_keys` for consecutive requests in one device call (one list entry per request)."""
        total = int(sum(num_samples))
        width = 1 << max(0, (total - 1).bit_length())  # powers of two: few compiles
        rids = np.zeros((width,), np.int32)
        idx = np.zeros((width,), np.int32)
        rids[:total] = np.repeat(np.arange(len(num_samples)) + first_request_id, num_samples)
        if total:
            idx[:total] = np.concatenate([np.arange(n) for n in num_samples])
        keys = np.asarray(_sample_keys(jax.random.key(seed), jnp.asarray(rids), jnp.asarray(idx)))
        return np.split(keys[:total], np.cumsum(num_samples)[:-1])

