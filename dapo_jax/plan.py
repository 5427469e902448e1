"""Memory planner: compiles the train and decode steps for a mesh and says whether they fit in HBM.

    python -m dapo_jax.plan --config configs/dapo_qwen2_5_32b.py --topology v5p-128
    python -m dapo_jax.plan --config configs/toy.py --devices 8 --hbm_gib 16 --config.mesh.tensor=2

Nothing is allocated: both steps are lowered with abstract inputs (`jax.ShapeDtypeStruct` with
shardings) and compiled, and XLA's `memory_analysis()` of the compiled per-device program gives the
numbers. For a TPU slice with libtpu installed, XLA:TPU compiles them for the slice's own devices
(`runtime.cross_lowering.tpu_topology_devices`: no TPU needed), so temporaries are the TPU
compiler's; otherwise XLA:CPU compiles them on fake CPU devices, one per chip, and temporaries
differ somewhat from what XLA:TPU / XLA:GPU would pick. Argument buffers follow from shapes and
shardings (the analytic column reproduces them).

For a named TPU or GPU topology the two steps are also lowered for that platform on an abstract
mesh of its chips (`runtime.cross_lowering`), with the kernels the model picks there (splash
attention and ragged paged decode on TPU, Pallas flash attention on GPU): a step that would not
lower on the hardware fails here, before a job is submitted (exit status 1; `--nolower` skips it).

What stays on device between steps follows dapo_jax/training/trainer.py: the train params and optimizer
state live for the whole run; the sampler's copy of the weights (sampling layout, model.dtype) and its
decode state (KV cache) exist only during rollouts (the trainer releases them before the update). So
the rollout phase is the decode step plus the train state, and the train phase is the update step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dapo_jax import experiment
from dapo_jax.models import hf_checkpoint
from dapo_jax.models.attention import score_block_bytes
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.qwen2 import jnp_dtype, param_shapes
from dapo_jax.models.sharding import MESH_AXES, make_mesh, mesh_platform, named_sharding
from dapo_jax.sampler import KVPoolPlan, PagedEngine, build_engine, kv_pool_plan
from dapo_jax.sampler.engine import Engine
from dapo_jax.runtime import cross_lowering
from dapo_jax.runtime.cli_errors import VERBOSE_HELP, UserError, absl_flags_parser, run_cli
from dapo_jax.runtime.cross_lowering import LoweredProgram
from dapo_jax.runtime.topology import GIB, Topology, custom_topology, parse_topology
from dapo_jax.training.update import (METRIC_SUMS, PACKED_FIELDS, batch_spec, build_apply_fn,
                                      build_packed_grad_fn, build_update_fn)

TIGHT_HEADROOM = 0.10  # below this the verdict warns: TPU temporaries can exceed XLA:CPU's


class OutOfMemory(RuntimeError):
    """XLA:TPU refused to compile a step: it needs more than one chip's HBM. (XLA:CPU has no
    limit, so the CPU plan gives the breakdown and suggestions.)"""

    def __init__(self, step: str, topology: Topology, message: str):
        super().__init__(f"XLA:TPU: the {step} does not fit one chip of {topology.name} "
                         f"({topology.hbm_gib:.1f} GiB): {message}")
        self.step = step


Progress = Callable[[str], None]


def _compile_step(step: str, topology: Topology | None, fn, progress: Progress | None = None,
                  compiler: str = ""):
    """`fn()`, with XLA:TPU's out-of-memory refusal turned into `OutOfMemory` for `step`;
    `progress` hears when it starts and how long it took (a 32B step takes minutes)."""
    t0 = time.perf_counter()
    if progress:
        progress(f"compiling the {step} with {compiler}...")
    try:
        result = fn()
        if progress:
            progress(f"compiled the {step} in {time.perf_counter() - t0:.1f} s")
        return result
    except Exception as e:  # noqa: BLE001 - jax raises its runtime error type for this
        text = str(e)
        if topology is None or "RESOURCE_EXHAUSTED" not in text:
            raise
        raise OutOfMemory(step, topology, text.strip().splitlines()[0]) from None


# ------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's per-device memory for one compiled step (bytes), plus its lower + compile time."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_seconds: float
    # Temporaries only XLA:CPU needs: it has no bfloat16 scatter, so writing into a bf16 KV cache
    # goes through float32 copies of the cache. TPU and GPU scatter bf16 in place.
    cpu_only_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Live bytes at the step's peak: inputs, outputs not aliased to (donated) inputs, temps."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                - self.cpu_only_bytes)


@dataclasses.dataclass(frozen=True)
class Analytic:
    """Per-device bytes computed from shapes and shardings alone (no compiler involved)."""

    params: int  # train layout, param_dtype
    opt_state: int  # AdamW moments (param_dtype) + counters
    grad_accumulator: int  # the float32 gradient sum carried across micro-batches
    minibatch: int  # padded: one mini-batch [num_micro, micro_batch, ...]; packed: one micro-batch
    remat_checkpoints: int  # activations kept for the backward pass under model.remat
    attention_scores: int  # float32 attention scores one layer holds at once (model.attention)
    sampler_params: int  # sampling layout (tensor-parallel, replicated over data/fsdp)
    decode_state: int  # KV cache + per-slot vectors
    kv_cache: int
    # Prompt K/V the rollout driver holds between prefill and insert: two prefill rows (one being
    # inserted, one filled ahead) for the paged cache, two max-length prefixes for the dense one.
    prefill_prefixes: int = 0


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes the plan was made for (from the config and the mesh)."""

    preset: str
    num_params: int
    param_dtype: str
    dtype: str
    cache_dtype: str
    remat: str
    mesh: dict[str, int]
    micro_batch_size: int
    num_micro: int
    seq_len: int
    prompt_len: int
    slots: int
    steps_per_sync: int
    decode_layout: str = "auto"  # the sampler's weight layout; "auto": the target platform's default
    # Packed updates (trainer.packing): a micro-batch is rows_per_device rows of row_length tokens
    # per data-parallel rank (the longest bucket: the most memory), token_budget >= their product.
    packing: bool = False
    token_budget: int = 0
    row_length: int = 0
    rows_per_device: int = 0
    # The rollout's KV cache (rollout.kv_cache): "paged" = a pool of kv_pool_tokens (0: slots x
    # max length) in pages of kv_page_size tokens; "dense" = one max-length row per slot.
    kv_cache: str = "dense"
    kv_pool_tokens: int = 0
    kv_page_size: int = 16
    samples_per_prompt: int = 1
    prefill_row_tokens: int = 2048  # the paged engine's packed prefill rows

    @property
    def batch_shards(self) -> int:
        """Devices a batch is split over: data x fsdp."""
        return self.mesh["data"] * self.mesh["fsdp"]

    @property
    def train_rows(self) -> int:
        """Rows one device holds in a micro-batch."""
        return self.rows_per_device if self.packing else self.micro_batch_size // self.batch_shards

    @property
    def train_seq(self) -> int:
        """Tokens per training row."""
        return self.row_length if self.packing else self.seq_len


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Everything compiled and computed for one config on one device count."""

    shapes: Shapes
    model: ModelConfig
    train: StepMemory  # padded: the whole update; packed: one micro-batch's gradient step
    decode: StepMemory
    analytic: Analytic
    alternatives: dict[str, Analytic]  # mesh description -> analytic numbers on that mesh
    apply: StepMemory | None = None  # packed: the optimizer step on the summed gradients
    # The train and decode steps lowered for the topology's TPU/GPU on an abstract mesh of its
    # chips, with the kernels the model picks there (empty for a custom topology).
    lowered: tuple[LoweredProgram, ...] = ()
    compiler: str = "XLA:CPU"  # what compiled the steps: "XLA:CPU" (fake devices) or "XLA:TPU"

    @property
    def train_peak_bytes(self) -> int:
        """Per-device bytes during the update (the larger of its steps when packed)."""
        # The sampler's buffers are not alive then: the trainer releases them first.
        if self.apply is None:
            return self.train.total_bytes
        # The optimizer state is resident, not an argument, while micro-batch gradients are summed.
        return max(self.train.total_bytes + self.analytic.opt_state, self.apply.total_bytes)

    @property
    def rollout_peak_bytes(self) -> int:
        """Per-device bytes during decoding: the decode step, the prompt prefixes waiting to be
        inserted, and the resident train state."""
        return (self.decode.total_bytes + self.analytic.prefill_prefixes + self.analytic.params
                + self.analytic.opt_state)

    @property
    def peak_bytes(self) -> int:
        """The larger of the two phases."""
        return max(self.train_peak_bytes, self.rollout_peak_bytes)


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """One change that lowers per-device memory, with the bytes it is expected to save."""

    phase: str  # "train" or "rollout"
    action: str
    saves_bytes: int
    note: str = ""


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """The planner's answer: measurement, the accelerator it was judged against, and a verdict."""

    measurement: Measurement
    topology: Topology
    verdict: str  # "FITS" or "DOES NOT FIT"
    headroom: float  # (HBM - peak) / HBM; negative when it does not fit
    suggestions: tuple[Suggestion, ...]

    @property
    def fits(self) -> bool:
        """True when the larger phase fits in one chip's HBM."""
        return self.verdict == "FITS"

    @property
    def peak_bytes(self) -> int:
        """Per-device bytes of the larger phase."""
        return self.measurement.peak_bytes

    @property
    def lowering_failed(self) -> bool:
        """True when a step did not lower for the topology's platform (it would fail there)."""
        return any(not p.ok for p in self.measurement.lowered)


# ------------------------------------------------------------------------------------------------
# Config -> model / shapes.


def model_config(config) -> ModelConfig:
    """The trainer's ModelConfig (`experiment.resolve_model_config`), vocabulary sized as it sizes it.

    A random-init preset takes its vocabulary from the tokenizer: the toy tokenizer is built in a
    scratch folder, any other is read from tokenizer.path (no checkpoint is ever read).
    """
    m = config.model
    size = None
    if m.preset and not m.path and not int(m.get("vocab_size", 0) or 0):
        from dapo_jax.models.tokenizer import load_tokenizer
        with tempfile.TemporaryDirectory(prefix="dapo_plan_") as tmp:
            size = len(load_tokenizer(experiment.tokenizer_source(config, tmp)))
    return experiment.resolve_model_config(config, tokenizer_size=size)


def _validate(config, mesh: Mesh) -> tuple[int, int]:
    """Checks the batch sizes against the mesh; returns (micro_batch_size, num_micro)."""
    t = config.trainer
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro, mini = int(t.micro_batch_size), int(t.mini_batch_size)
    if micro <= 0 or mini <= 0:
        raise UserError(f"trainer.mini_batch_size ({mini}) and trainer.micro_batch_size ({micro}) "
                        "must be positive")
    if mini % micro:
        raise UserError(f"trainer.mini_batch_size ({mini}) must be a multiple of "
                        f"trainer.micro_batch_size ({micro})")
    if micro % shards:
        raise UserError(f"trainer.micro_batch_size ({micro}) must be a multiple of mesh data x fsdp "
                        f"({shards}): each device takes an equal share of a micro-batch")
    for name in ("max_prompt_length", "max_response_length"):
        if int(config.data[name]) <= 0:
            raise UserError(f"data.{name} must be positive, got {config.data[name]}")
    if int(config.rollout.max_concurrent_decodes) <= 0:
        raise UserError("rollout.max_concurrent_decodes must be positive, got "
                        f"{config.rollout.max_concurrent_decodes}")
    return micro, mini // micro


# ------------------------------------------------------------------------------------------------
# Analytic bytes.


def shard_bytes(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array with this global shape, dtype and sharding."""
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def tree_shard_bytes(tree: Any) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    return sum(shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))


def abstract_params(cfg: ModelConfig, shardings: Any, dtype: str | None = None) -> Any:
    """ShapeDtypeStructs of the parameters in `dtype` (default param_dtype), with the shardings."""
    dt = jnp_dtype(dtype or cfg.param_dtype)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh), param_shapes(cfg),
                        shardings, is_leaf=lambda x: isinstance(x, tuple))


def opt_state_shardings(opt_abstract: Any, params_abstract: Any, mesh: Mesh) -> Any:
    """Shardings the optimizer state gets next to the params: moments follow their parameter.

    A state leaf whose key path ends with a parameter's path (and has its shape) takes that
    parameter's sharding; counters and hyperparameters are replicated.
    """
    by_path = {tuple(str(k) for k in path): leaf
               for path, leaf in jax.tree_util.tree_leaves_with_path(params_abstract)}
    rep = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            p = by_path.get(keys[start:])
            if p is not None and p.shape == leaf.shape:
                return p.sharding
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def _divides(n: int, k: int) -> int:
    """k when it divides n, else 1 (the sharding rules replicate instead of splitting unevenly)."""
    return k if k > 0 and n % k == 0 else 1


def activation_bytes(cfg: ModelConfig, rows: int, seq: int, tensor: int, remat: str) -> int:
    """Activations one device keeps for the backward pass over all layers, for `rows` sequences.

    `full` keeps each layer's input; `dots` also keeps the projection outputs (q/k/v/o, gate, up,
    down); `none` keeps every intermediate, dominated by the [heads, T, T] attention scores. Layer
    inputs are split over `tensor` along the sequence (the "act_seq" sharding rule) when it divides.
    """
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h = cfg.num_heads // _divides(cfg.num_heads, tensor)
    k = cfg.num_kv_heads // _divides(cfg.num_kv_heads, tensor)
    f_dev = f // _divides(f, tensor)
    a = np.dtype(jnp_dtype(cfg.dtype)).itemsize
    per_token = {
        "full": d * a // _divides(seq, tensor),
        "dots": (2 * d + (h + 2 * k) * hd + h * hd + 2 * f_dev) * a,
        "none": (4 * d + 2 * (h + 2 * k) * hd + 4 * f_dev) * a + h * seq * (4 + a),
    }[remat]
    return cfg.num_layers * rows * seq * per_token


def attention_score_bytes(cfg: ModelConfig, rows: int, seq: int, tensor: int,
                          implementation: str | None = None) -> int:
    """Float32 attention scores one layer holds at once on one device, for `cfg.attention`.

    "dense" materialises [rows, heads, T, T]; "blockwise" one key block [rows, heads, T, block];
    the Pallas kernels keep their tiles on chip. "auto" is counted as blockwise: an upper bound for
    the kernels it picks on TPU/GPU, and what the planner's XLA:CPU compile runs.
    """
    impl = implementation or cfg.attention
    if impl == "auto":
        impl = "blockwise"
    h = cfg.num_heads // _divides(cfg.num_heads, tensor)
    return score_block_bytes(impl, rows, h, seq)


def analytic(cfg: ModelConfig, mesh: Mesh, shapes: Shapes, tx) -> Analytic:
    """Per-device bytes of every persistent buffer on `mesh`, from shapes and shardings."""
    train_sh = hf_checkpoint.param_shardings(cfg, mesh)
    params = abstract_params(cfg, train_sh)
    opt = _abstract_opt_state(tx, params, mesh)
    grads = sum(shard_bytes(p.shape, jnp.float32, p.sharding) for p in jax.tree.leaves(params))
    engine = _engine(cfg, mesh, shapes)
    sampler = engine.abstract_params()  # Engine.load_params casts (and unstacks)
    state = _abstract_decode_state(engine)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = (shapes.rows_per_device if shapes.packing
            else shapes.micro_batch_size // batch_shards)
    tensor = mesh.shape["tensor"]
    inputs = _abstract_micro(mesh, shapes) if shapes.packing else _abstract_minibatch(mesh, shapes)
    return Analytic(
        params=tree_shard_bytes(params), opt_state=tree_shard_bytes(opt), grad_accumulator=grads,
        minibatch=tree_shard_bytes(inputs),
        remat_checkpoints=activation_bytes(cfg, rows, shapes.train_seq, tensor, cfg.remat),
        attention_scores=attention_score_bytes(cfg, rows, shapes.train_seq, tensor),
        sampler_params=tree_shard_bytes(sampler), decode_state=tree_shard_bytes(state),
        kv_cache=tree_shard_bytes({k: v for k, v in state["cache"].items()
                                   if k in ("k", "v", "kv")}),  # dense K, V or the paged pool
        prefill_prefixes=2 * _prefix_bytes(engine, cfg, shapes))


def _prefix_bytes(engine: Engine, cfg: ModelConfig, shapes: Shapes) -> int:
    """Per-device bytes of one prefix the driver holds: a packed row's K/V (paged) or one prompt's
    dense K and V at the largest prefill bucket."""
    dtype = jnp.dtype(shapes.cache_dtype)
    if isinstance(engine, PagedEngine):
        length = engine.prefix_row_length
        return shard_bytes((cfg.num_layers, length, cfg.num_kv_heads, 2, cfg.head_dim), dtype,
                           engine.prefix_row_sharding(length))
    shape = (cfg.num_layers, 1, cfg.num_kv_heads, engine.buckets[-1], cfg.head_dim)
    sharding = named_sharding(engine.mesh, ("layers", None, "act_kv_heads", None, "head_dim"),
                              shape, engine.rules)
    return 2 * shard_bytes(shape, dtype, sharding)


# ------------------------------------------------------------------------------------------------
# Abstract inputs and compilation.


def _abstract_opt_state(tx, params: Any, mesh: Mesh) -> Any:
    opt = jax.eval_shape(tx.init, params)
    shardings = opt_state_shardings(opt, params, mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt,
                        shardings)


def _abstract_minibatch(mesh: Mesh, shapes: Shapes) -> dict[str, jax.ShapeDtypeStruct]:
    """One mini-batch as the update step takes it: [num_micro, micro_batch, ...] per field."""
    m, b, t = shapes.num_micro, shapes.micro_batch_size, shapes.seq_len
    r = t - shapes.prompt_len
    rep = NamedSharding(mesh, PartitionSpec())

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
            mesh, batch_spec(len(shape), leading=1)))

    return {"input_ids": arr((m, b, t), jnp.int32), "attention_mask": arr((m, b, t), jnp.int32),
            "response_mask": arr((m, b, r), jnp.int32), "old_logprobs": arr((m, b, r), jnp.float32),
            "advantages": arr((m, b), jnp.float32),
            "token_count": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            "seq_count": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)}


def _abstract_micro(mesh: Mesh, shapes: Shapes) -> dict[str, jax.ShapeDtypeStruct]:
    """One packed micro-batch as the gradient step takes it: [ranks * rows, row_length]."""
    shape = (shapes.batch_shards * shapes.rows_per_device, shapes.row_length)
    sharding = NamedSharding(mesh, batch_spec(2))
    dtypes = {"input_ids": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
              "response_mask": jnp.int32, "old_logprobs": jnp.float32, "advantages": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=sharding) for k in PACKED_FIELDS}


def _engine(cfg: ModelConfig, mesh: Mesh, shapes: Shapes) -> Engine:
    # Stop ids change no buffer: the model's EOS stands in for the tokenizer's.
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    stop = eos if isinstance(eos, (list, tuple)) else [eos]
    return build_engine(cfg, kv_cache=shapes.kv_cache, kv_pool_tokens=shapes.kv_pool_tokens,
                        kv_page_size=shapes.kv_page_size,
                        prefill_row_tokens=shapes.prefill_row_tokens,
                        max_concurrent_decodes=shapes.slots,
                        max_prefill_length=shapes.prompt_len, max_target_length=shapes.seq_len,
                        stop_token_ids=stop, mesh=mesh, cache_dtype=shapes.cache_dtype,
                        decode_layout=shapes.decode_layout)


# The response length the concurrency estimate assumes: DAPO responses average about a quarter
# of the maximum early in training (they grow later; the at-maximum count is the floor).
EXPECTED_RESPONSE_FRACTION = 0.25


def kv_pool(shapes: Shapes, cfg: ModelConfig) -> KVPoolPlan | None:
    """The paged KV pool of the rollout phase (None for the dense cache): pages, bytes and how many
    samples fit at once, per (data, fsdp) shard of the slots and pages."""
    if shapes.kv_cache != "paged":
        return None
    shards = shapes.batch_shards if shapes.slots % shapes.batch_shards == 0 else 1
    response = shapes.seq_len - shapes.prompt_len
    return kv_pool_plan(cfg, shapes.kv_pool_tokens, shapes.kv_page_size, slots=shapes.slots,
                        max_target_length=shapes.seq_len, cache_dtype=shapes.cache_dtype,
                        expected_length=shapes.prompt_len + int(EXPECTED_RESPONSE_FRACTION
                                                                * response),
                        samples_per_prompt=shapes.samples_per_prompt,
                        prompt_length=shapes.prompt_len, shards=shards)


def _abstract_decode_state(engine: Engine) -> Any:
    state = jax.eval_shape(engine.init_decode_state)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state,
                        engine.state_shardings)


def _memory(compiled, seconds: float) -> StepMemory:
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("XLA returned no memory analysis for this backend; run the planner on "
                           "CPU (JAX_PLATFORMS=cpu), which `python -m dapo_jax.plan` arranges")
    return StepMemory(argument_bytes=int(m.argument_size_in_bytes),
                      output_bytes=int(m.output_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
                      temp_bytes=int(m.temp_size_in_bytes),
                      code_bytes=int(m.generated_code_size_in_bytes), compile_seconds=seconds)


def compile_train_step(config, cfg: ModelConfig, mesh: Mesh, shapes: Shapes, tx) -> StepMemory:
    """Lowers and compiles the update for `mesh`: padded, one optimizer update (all micro-batches
    of a mini-batch); packed, one micro-batch's gradient step at the longest row bucket."""
    t0 = time.perf_counter()
    compiled = lower_train_step(config, cfg, mesh, shapes, tx).compile()
    return _memory(compiled, time.perf_counter() - t0)


def compile_apply_step(cfg: ModelConfig, mesh: Mesh, tx) -> StepMemory:
    """Lowers and compiles the packed update's optimizer step (summed gradients -> AdamW)."""
    t0 = time.perf_counter()
    param_sh = hf_checkpoint.param_shardings(cfg, mesh)
    params = abstract_params(cfg, param_sh)
    opt = _abstract_opt_state(tx, params, mesh)
    grads = abstract_params(cfg, param_sh, "float32")
    apply = build_apply_fn(tx, mesh, param_sh, jax.tree.map(lambda x: x.sharding, opt))
    compiled = apply.lower(params, opt, grads, _replicated(mesh)).compile()
    return _memory(compiled, time.perf_counter() - t0)


def _replicated(mesh: Mesh, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def trace_train_step(config, cfg: ModelConfig, mesh: Mesh, shapes: Shapes, tx) -> Any:
    """The trainer's update traced for abstract inputs of the planned shapes: padded,
    `training.update.build_update_fn`; packed, `build_packed_grad_fn` (one micro-batch), both
    with the experiment's loss settings. `mesh` may be abstract (`jax.sharding.AbstractMesh`)."""
    param_sh = hf_checkpoint.param_shardings(cfg, mesh)
    params = abstract_params(cfg, param_sh)
    loss = experiment.loss_settings(config, mesh)
    if shapes.packing:
        grad = build_packed_grad_fn(cfg, mesh, param_sh, loss, shapes.seq_len - shapes.prompt_len)
        grads = abstract_params(cfg, param_sh, "float32")
        sums = {k: _replicated(mesh) for k in METRIC_SUMS}
        return grad.trace(params, grads, sums, _abstract_micro(mesh, shapes), _replicated(mesh),
                          _replicated(mesh))
    opt = _abstract_opt_state(tx, params, mesh)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt)
    update = build_update_fn(cfg, tx, mesh, param_sh, opt_sh, shapes.prompt_len, loss)
    return update.trace(params, opt, _abstract_minibatch(mesh, shapes), _replicated(mesh))


def lower_train_step(config, cfg: ModelConfig, mesh: Mesh, shapes: Shapes, tx) -> Any:
    """`trace_train_step` lowered for jax's backend."""
    return trace_train_step(config, cfg, mesh, shapes, tx).lower()


def trace_decode_step(config, cfg: ModelConfig, mesh: Mesh, shapes: Shapes,
                      cache_dtype: str | None = None) -> Any:
    """The sampler's generate step (steps_per_sync decode steps, all slots) traced for abstract
    inputs; `mesh` may be abstract."""
    engine = _engine(cfg, mesh, dataclasses.replace(shapes, cache_dtype=cache_dtype or
                                                    shapes.cache_dtype))
    generate = engine.generate_program(shapes.steps_per_sync,
                                       experiment.sampling_params(config.rollout))
    return generate.trace(engine.abstract_params(), _abstract_decode_state(engine))


def compile_decode_step(config, cfg: ModelConfig, mesh: Mesh, shapes: Shapes) -> StepMemory:
    """Lowers and compiles the sampler's generate step (steps_per_sync decode steps, all slots)."""
    t0 = time.perf_counter()

    def compile_with_cache(cache_dtype: str):
        return trace_decode_step(config, cfg, mesh, shapes, cache_dtype).lower().compile()

    compiled = compile_with_cache(shapes.cache_dtype)
    upcast = 0
    if shapes.cache_dtype != "float32" and mesh_platform(mesh) == "cpu":
        # A float32 cache needs no conversion, so its temporaries are the step's own; the excess
        # of the bf16 compile over them is XLA:CPU's float32 round trip of the cache.
        plain = compile_with_cache("float32").memory_analysis().temp_size_in_bytes
        upcast = max(0, int(compiled.memory_analysis().temp_size_in_bytes) - int(plain))
    mem = _memory(compiled, time.perf_counter() - t0)
    return dataclasses.replace(mem, cpu_only_bytes=upcast)


def _candidate_meshes(mesh: Mesh, cfg: ModelConfig, micro: int) -> dict[str, dict[str, int]]:
    """Alternative mesh shapes on the same devices: data folded into fsdp, tensor doubled."""
    d, f, t = (mesh.shape[a] for a in MESH_AXES)
    out = {}
    if d > 1:
        out["fsdp"] = {"data": 1, "fsdp": d * f, "tensor": t}
    if f % 2 == 0 and t * 2 <= cfg.num_heads and micro % (d * f // 2) == 0:
        out["tensor"] = {"data": d, "fsdp": f // 2, "tensor": t * 2}
    return out


def lower_for_topology(config, cfg: ModelConfig, shapes: Shapes, tx, topology: Topology
                       ) -> tuple[LoweredProgram, ...]:
    """The train and decode steps of `shapes` lowered for `topology`'s TPU or GPU on an abstract
    mesh of its chips (the kernels the model picks there included); () for a custom topology."""
    if topology.kind not in ("tpu", "gpu") or not topology.device_kind:
        return ()
    mesh = cross_lowering.abstract_mesh(shapes.mesh, topology.device_kind, topology.kind,
                                        topology.cores_per_chip)
    train = "train gradient step" if shapes.packing else "train update step"
    return (cross_lowering.lower(train, lambda: trace_train_step(config, cfg, mesh, shapes, tx),
                                 mesh),
            cross_lowering.lower("decode step", lambda: trace_decode_step(config, cfg, mesh, shapes),
                                 mesh))


def measure(config, devices: Sequence[jax.Device] | None = None, *,
            lower_for: Topology | None = None, topology: Topology | None = None,
            progress: Progress | None = None) -> Measurement:
    """Compiles both steps for `config` on `devices` (default: all) and computes analytic bytes;
    with `lower_for`, also lowers them for that topology's accelerator (`lower_for_topology`).

    `devices` may be a TPU slice's (`cross_lowering.tpu_topology_devices`, `topology`): XLA:TPU
    then compiles the steps, with the TPU kernels, on this machine, and raises `OutOfMemory` for a
    step that does not fit a chip. `progress` (e.g. a stderr printer) hears each step's start and
    end."""
    devices = list(devices if devices is not None else jax.devices())
    cfg = model_config(config)
    mesh = make_mesh({a: int(config.mesh[a]) for a in MESH_AXES}, devices=devices)
    shapes = planned_shapes(config, cfg, mesh)
    micro = shapes.micro_batch_size
    tx, _ = experiment.optimizer(config)
    platform = mesh_platform(mesh)
    # Kernel choices follow the mesh's platform, not this process's (CPU) backend.
    target = (contextlib.nullcontext() if platform == jax.default_backend()
              else cross_lowering.compiling_for(mesh.abstract_mesh))
    tpu = topology if platform == "tpu" else None
    train_name = "train gradient step" if shapes.packing else "train update step"
    compiler = f"XLA:{platform.upper()} for {len(devices)} devices"
    with target:
        train = _compile_step(train_name, tpu,
                              lambda: compile_train_step(config, cfg, mesh, shapes, tx),
                              progress, compiler)
        apply = (_compile_step("optimizer step", tpu, lambda: compile_apply_step(cfg, mesh, tx),
                               progress, compiler) if shapes.packing else None)
        decode = _compile_step("decode step", tpu,
                               lambda: compile_decode_step(config, cfg, mesh, shapes),
                               progress, compiler)
    alternatives = {}
    for label, shape in _candidate_meshes(mesh, cfg, micro).items():
        alt_mesh = make_mesh(shape, devices=devices)
        alt_shapes = dataclasses.replace(shapes, mesh=shape)
        alternatives[label] = analytic(cfg, alt_mesh, alt_shapes, tx)
    lowered = lower_for_topology(config, cfg, shapes, tx, lower_for) if lower_for else ()
    return Measurement(shapes=shapes, model=cfg, train=train, decode=decode,
                       analytic=analytic(cfg, mesh, shapes, tx), alternatives=alternatives,
                       apply=apply, lowered=lowered, compiler=f"XLA:{platform.upper()}")


def planned_shapes(config, cfg: ModelConfig, mesh: Mesh) -> Shapes:
    """The sizes the trainer runs `config` at on `mesh` (batch sizes checked against the mesh)."""
    micro, num_micro = _validate(config, mesh)
    prompt = int(config.data.max_prompt_length)
    packed = {}
    if experiment.uses_packing(config):
        try:
            layout = experiment.packing_layout(config, mesh)
        except ValueError as e:
            raise UserError(str(e)) from e
        row_length, rows = layout.buckets[-1]
        packed = dict(packing=True, token_budget=layout.budget, row_length=row_length,
                      rows_per_device=rows)
    r = config.rollout
    return Shapes(**packed, kv_cache=str(r.get("kv_cache", "dense")),
                  kv_pool_tokens=int(r.get("kv_pool_tokens", 0)),
                  kv_page_size=int(r.get("kv_page_size", 16)), samples_per_prompt=int(r.n),
                  prefill_row_tokens=int(r.get("prefill_row_tokens", 2048)),
                  preset=config.model.preset or config.model.path, num_params=cfg.num_params,
                  param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                  cache_dtype=config.rollout.cache_dtype or cfg.dtype, remat=cfg.remat,
                  mesh={a: int(mesh.shape[a]) for a in MESH_AXES}, micro_batch_size=micro,
                  num_micro=num_micro, seq_len=prompt + int(config.data.max_response_length),
                  prompt_len=prompt, slots=int(config.rollout.max_concurrent_decodes),
                  steps_per_sync=max(1, int(config.rollout.steps_per_sync)),
                  decode_layout=config.rollout.decode_layout)


# ------------------------------------------------------------------------------------------------
# Verdict and suggestions (pure functions of a Measurement and an HBM size).


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _mesh_str(shape: dict[str, int]) -> str:
    return " ".join(f"{a}={shape[a]}" for a in MESH_AXES)


def _persistent(a: Analytic, phase: str) -> int:
    """Buffers that live through a phase whatever the compiler does."""
    if phase == "train":  # the trainer releases the sampler's buffers before the update
        return a.params + a.opt_state + a.grad_accumulator
    return a.params + a.opt_state + a.sampler_params + a.decode_state


def _alt_shape(s: Shapes, label: str) -> dict[str, int]:
    d, f, t = (s.mesh[a] for a in MESH_AXES)
    return {"fsdp": {"data": 1, "fsdp": d * f, "tensor": t},
            "tensor": {"data": d, "fsdp": f // 2, "tensor": t * 2}}[label]


def _fewer_slots(phase: str, s: Shapes, per_slot: float, over: int) -> list[Suggestion]:
    """Fewer decode slots: enough to cover `over` bytes at `per_slot` bytes per slot and device."""
    even = s.slots % s.batch_shards == 0
    slots_dev = s.slots // s.batch_shards if even else s.slots
    if slots_dev <= 1 or per_slot <= 0:
        return []
    new_dev = max(1, slots_dev - max(1, math.ceil(over / per_slot)))
    new_slots = new_dev * (s.batch_shards if even else 1)
    return [Suggestion(phase, f"--config.rollout.max_concurrent_decodes={new_slots} (now {s.slots})",
                       int(per_slot * (slots_dev - new_dev)),
                       "fewer sequences decode at once; rollout takes more decode steps")]


def _shared_suggestions(phase: str, m: Measurement) -> list[Suggestion]:
    """Changes that help both phases: a different mesh, a bfloat16 sampler copy."""
    s, a = m.shapes, m.analytic
    out = []
    rows = s.train_rows
    for label, alt in m.alternatives.items():
        saved = _persistent(a, phase) - _persistent(alt, phase)
        if saved <= 0:
            continue
        shape = _alt_shape(s, label)
        note = "weights, optimizer state and KV cache split over more chips"
        if label == "tensor" and phase == "train" and not s.packing:
            note += (f"; micro-batch rows per device go {rows} -> "
                     f"{s.micro_batch_size // (shape['data'] * shape['fsdp'])}, so activations grow")
        out.append(Suggestion(phase, f"mesh {_mesh_str(shape)} (now {_mesh_str(s.mesh)})", saved,
                              note))
    return out


def _train_suggestions(m: Measurement, hbm: int) -> list[Suggestion]:
    s, a = m.shapes, m.analytic
    over = m.train_peak_bytes - hbm
    out: list[Suggestion] = []
    rows = s.train_rows
    if s.remat != "full":
        full = activation_bytes(m.model, rows, s.train_seq, s.mesh["tensor"], "full")
        out.append(Suggestion("train", f"--config.model.remat=full (now {s.remat})",
                              max(0, a.remat_checkpoints - full),
                              "recomputes each layer in the backward pass (~1/3 more train FLOPs)"))
    # Everything in the train step's temporaries beyond the gradient sum scales with rows/device.
    act = max(0, m.train.temp_bytes - (0 if s.packing else a.grad_accumulator))
    if s.packing and rows > 1 and act > 0:
        per_row = act / rows
        new_rows = max(1, rows - max(1, math.ceil(over / per_row)))
        out.append(Suggestion("train", f"--config.trainer.max_tokens_per_micro_batch="
                              f"{new_rows * s.row_length} (now {s.token_budget}; {rows} -> "
                              f"{new_rows} full-length rows per device)",
                              int(per_row * (rows - new_rows)),
                              "more micro-batches per update, same mini-batch and same gradient"))
    elif rows > 1 and act > 0:
        per_row = act / rows
        new_rows = max(1, rows - max(1, math.ceil(over / per_row)))
        mini = s.micro_batch_size * s.num_micro
        while mini % (new_rows * s.batch_shards):  # micro-batches must split the mini-batch evenly
            new_rows -= 1
        out.append(Suggestion("train", f"--config.trainer.micro_batch_size="
                              f"{new_rows * s.batch_shards} (now {s.micro_batch_size}; "
                              f"{rows} -> {new_rows} rows per device)",
                              int(per_row * (rows - new_rows)),
                              "more micro-batches per update, same mini-batch and same gradient"))
    out += _shared_suggestions("train", m)
    if s.param_dtype == "float32":
        out.append(Suggestion("train", "--config.model.param_dtype=bfloat16",
                              (a.params + a.opt_state) // 2,
                              "last resort: with lr ~1e-6 most AdamW updates fall below bfloat16's "
                              "resolution and are lost; prefer the options above"))
    return out


def _rollout_suggestions(m: Measurement, hbm: int) -> list[Suggestion]:
    s, a = m.shapes, m.analytic
    over = m.rollout_peak_bytes - hbm
    slots_dev = s.slots // s.batch_shards if s.slots % s.batch_shards == 0 else s.slots
    # The decode state and nearly all decode temporaries (logits, sampling) scale with slots.
    out = _fewer_slots("rollout", s, max(0, m.decode.total_bytes - a.sampler_params) / slots_dev,
                       over)
    if s.cache_dtype == "float32":
        out.append(Suggestion("rollout", "--config.rollout.cache_dtype=bfloat16", a.kv_cache // 2))
    return out + _shared_suggestions("rollout", m)


def _merge(suggestions: list[Suggestion]) -> list[Suggestion]:
    """One entry per action; an action that helps both phases keeps the smaller saving."""
    merged: dict[str, Suggestion] = {}
    for x in suggestions:
        y = merged.get(x.action)
        if y is None:
            merged[x.action] = x
        else:
            merged[x.action] = dataclasses.replace(y, phase="train+rollout",
                                                   saves_bytes=min(x.saves_bytes, y.saves_bytes))
    return list(merged.values())


def assess(measurement: Measurement, topology: Topology) -> PlanResult:
    """The verdict for `measurement` on `topology` (no compilation), with suggestions if needed."""
    hbm = topology.hbm_bytes
    m = measurement
    if topology.chips != math.prod(m.shapes.mesh.values()):
        raise ValueError(f"the measurement was made on {math.prod(m.shapes.mesh.values())} devices "
                         f"but topology {topology.name} has {topology.chips} chips")
    headroom = (hbm - m.peak_bytes) / hbm
    verdict = "FITS" if m.peak_bytes <= hbm else "DOES NOT FIT"
    suggestions: list[Suggestion] = []
    if m.train_peak_bytes > hbm:
        suggestions += _train_suggestions(m, hbm)
    if m.rollout_peak_bytes > hbm:
        suggestions += _rollout_suggestions(m, hbm)
    # Drop changes too small to matter (e.g. a mesh change that only splits the norms further).
    floor = max(2 ** 20, int(0.01 * max(0, m.peak_bytes - hbm)))
    suggestions = [x for x in _merge(suggestions) if x.saves_bytes >= floor]
    suggestions.sort(key=lambda x: (not x.phase.startswith("train"), -x.saves_bytes))
    return PlanResult(measurement=m, topology=topology, verdict=verdict, headroom=headroom,
                      suggestions=tuple(suggestions))


def _topology(topology: Topology | str | None, devices: int | None, hbm_gib: float | None
              ) -> Topology:
    if topology is not None and (devices is not None or hbm_gib is not None):
        raise UserError("give either a topology name or devices + hbm_gib, not both")
    if topology is not None:
        return parse_topology(topology) if isinstance(topology, str) else topology
    if devices is None or hbm_gib is None:
        raise UserError("give a topology (e.g. --topology v5p-128) or both --devices and --hbm_gib")
    return custom_topology(devices, hbm_gib)


COMPILERS = ("auto", "cpu", "tpu")


def resolve_compiler(compiler: str, topology: Topology) -> str:
    """"cpu" or "tpu": what compiles the steps. "auto" is XLA:TPU (deviceless) for a TPU slice
    with a power-of-two chip count when libtpu is installed, XLA:CPU on fake devices otherwise."""
    if compiler not in COMPILERS:
        raise UserError(f"--compiler must be one of {COMPILERS}, got {compiler!r}")
    if compiler != "auto":
        return compiler
    grid_ok = topology.kind == "tpu" and topology.chips & (topology.chips - 1) == 0
    return "tpu" if grid_ok and cross_lowering.libtpu_installed() else "cpu"


def plan(config, topology: Topology | str | None = None, *, devices: int | None = None,
         hbm_gib: float | None = None, lower: bool = True, compiler: str = "auto",
         progress: Progress | None = None) -> PlanResult:
    """Compiles `config`'s train and decode steps for the topology's chips and judges the fit.

    `compiler` (`resolve_compiler`): "tpu" compiles with XLA:TPU for the slice's own devices
    (libtpu, no TPU needed); "cpu" uses the first `chips` JAX devices already present (fake CPU
    devices; the CLI creates them). With `lower` (and a named TPU/GPU topology) the steps are also
    lowered for that accelerator, naming the kernels each calls. `progress` hears each compile.
    """
    topo = _topology(topology, devices, hbm_gib)
    if resolve_compiler(compiler, topo) == "tpu":
        slice_devices = cross_lowering.tpu_topology_devices(topo)
        return assess(measure(config, slice_devices, lower_for=topo if lower else None,
                              topology=topo, progress=progress), topo)
    available = jax.devices()
    if len(available) < topo.chips:
        raise ValueError(
            f"{topo.name} needs {topo.chips} devices but JAX has {len(available)}: run "
            f"`python -m dapo_jax.plan` (it sets them up), or set JAX_PLATFORMS=cpu and "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.chips} before importing jax")
    return assess(measure(config, available[:topo.chips], lower_for=topo if lower else None,
                          progress=progress), topo)


# ------------------------------------------------------------------------------------------------
# Report.


def _decode_line(s: Shapes, cfg: ModelConfig) -> str:
    pool = kv_pool(s, cfg)
    if pool is None:
        return (f"decode {s.slots} slots x {s.seq_len} tokens (dense KV cache), cache "
                f"{s.cache_dtype}, {s.steps_per_sync} steps per call")
    shards = s.batch_shards if s.slots % s.batch_shards == 0 else 1
    chips = math.prod(s.mesh.values())
    expected = s.prompt_len + int(EXPECTED_RESPONSE_FRACTION * (s.seq_len - s.prompt_len))
    per = lambda n: f"{n / chips:.1f}"  # noqa: E731  (a sample decodes on its tensor group)
    return (f"decode {s.slots} slots, paged KV cache: {pool.num_pages:,} pages of {pool.page_size} "
            f"tokens ({pool.num_pages * pool.page_size:,} tokens, {pool.num_pages // shards:,} pages "
            f"per data x fsdp shard), cache {s.cache_dtype}, {s.steps_per_sync} steps per call; "
            f"concurrent samples: {pool.concurrent_samples_at_max} at the maximum "
            f"{s.seq_len:,} tokens, {pool.concurrent_samples} at {expected:,} tokens (a quarter of "
            f"the max response), i.e. {per(pool.concurrent_samples_at_max)} / "
            f"{per(pool.concurrent_samples)} per chip ({s.samples_per_prompt} samples per prompt "
            f"share their prompt pages)")


def _lowering_lines(m: Measurement, t: Topology) -> list[str]:
    if not m.lowered:
        return []
    lines = [f"lowered for {t.device_kind} ({m.lowered[0].platform}, abstract "
             f"{_mesh_str(m.shapes.mesh)} mesh, kernels as the model picks them there):"]
    for p in m.lowered:
        if not p.ok:
            lines.append(f"  {p.name}: FAILED ({p.error}); it would fail on {t.name} too")
        elif p.kernels:
            sites = f"{p.kernel_calls} call site" + ("s" if p.kernel_calls != 1 else "")
            lines.append(f"  {p.name}: ok in {p.seconds:.1f} s; Pallas kernels "
                         f"{', '.join(p.kernels)} ({sites})")
        else:
            lines.append(f"  {p.name}: ok in {p.seconds:.1f} s; XLA only (no Pallas kernel)")
    return lines


def format_report(result: PlanResult) -> str:
    """A human-readable per-device memory table, verdict and suggestions."""
    m, t = result.measurement, result.topology
    s, a = m.shapes, m.analytic
    rows = s.train_rows
    g = lambda n: f"{n / GIB:9.2f}"  # noqa: E731
    if s.packing:
        batch_line = (
            f"mesh {_mesh_str(s.mesh)}; packed train micro-batches: token budget {s.token_budget:,} "
            f"tokens per device = {rows} row(s) x {s.row_length:,} tokens at the longest row "
            f"bucket (samples end to end, no padding to the maximum); micro-batches per update "
            f"follow the tokens (at most {-(-s.micro_batch_size * s.num_micro // (rows * s.batch_shards))} "
            f"when every sample is full length), remat={s.remat}, params {s.param_dtype}, "
            f"compute {s.dtype}")
    else:
        batch_line = (
            f"mesh {_mesh_str(s.mesh)}; train micro-batch {s.micro_batch_size} x {s.seq_len} tokens "
            f"({rows} rows/device, padded), {s.num_micro} micro-batches per update, "
            f"remat={s.remat}, params {s.param_dtype}, compute {s.dtype}")
    step_name = "gradient step (one micro-batch)" if s.packing else "update step"
    inputs_name = "micro-batch inputs" if s.packing else "mini-batch inputs"
    args_analytic = (a.params + a.grad_accumulator + a.minibatch if s.packing
                     else a.params + a.opt_state + a.minibatch)
    lines = [
        f"Memory plan: {s.preset} ({s.num_params / 1e9:.2f}B params) on {t.name}: {t.chips} "
        f"devices x {t.hbm_gib:.1f} GiB HBM, {t.hosts} host(s)",
        batch_line,
        _decode_line(s, m.model),
        f"compile time: train {step_name} {m.train.compile_seconds:.1f} s, decode step "
        f"{m.decode.compile_seconds:.1f} s (lower + compile on {m.compiler}"
        f"{', deviceless: libtpu, no TPU' if m.compiler == 'XLA:TPU' else ''})",
        *_lowering_lines(m, t),
        "",
        f"{'per device, GiB':<52}{'XLA':>9}{'analytic':>10}",
        f"train {step_name}",
        f"{'  params (train layout, ' + s.param_dtype + ')':<52}{'':>9}{g(a.params):>10}",
        *([f"{'  gradient accumulator (float32, donated)':<52}{'':>9}{g(a.grad_accumulator):>10}"]
          if s.packing else
          [f"{'  optimizer state (AdamW moments)':<52}{'':>9}{g(a.opt_state):>10}"]),
        f"{'  ' + inputs_name:<52}{'':>9}{g(a.minibatch):>10}",
        f"{'  = arguments':<52}{g(m.train.argument_bytes)}{g(args_analytic):>10}",
        f"{'  gradients + activations + temporaries':<52}{g(m.train.temp_bytes)}",
        *([] if s.packing else
          [f"{'    of which gradient accumulator (float32)':<52}{'':>9}"
           f"{g(a.grad_accumulator):>10}"]),
        f"{'    of which remat checkpoints (' + s.remat + ')':<52}{'':>9}"
        f"{g(a.remat_checkpoints):>10}",
        f"{'    one layer of attention scores (float32)':<52}{'':>9}{g(a.attention_scores):>10}",
        f"{'  outputs not aliased to donated inputs':<52}"
        f"{g(m.train.output_bytes - m.train.alias_bytes)}",
        f"{'  = ' + step_name:<52}{g(m.train.total_bytes)}",
        *([f"{'  + optimizer state (resident)':<52}{'':>9}{g(a.opt_state):>10}",
           f"{'  optimizer step (params + moments + gradients)':<52}"
           f"{g(m.apply.total_bytes)}"] if s.packing and m.apply is not None else []),
        f"{'  total':<52}{g(m.train_peak_bytes)}",
        "rollout (decode step)",
        f"{'  train params + optimizer state (resident)':<52}{'':>9}"
        f"{g(a.params + a.opt_state):>10}",
        f"{'  sampler params (sampling layout, ' + s.dtype + ')':<52}{'':>9}"
        f"{g(a.sampler_params):>10}",
        f"{'  KV cache (' + s.cache_dtype + (', paged pool' if s.kv_cache == 'paged' else '') + ')':<52}"
        f"{'':>9}{g(a.kv_cache):>10}",
        f"{'  = decode arguments (sampler params + decode state)':<52}"
        f"{g(m.decode.argument_bytes)}{g(a.sampler_params + a.decode_state):>10}",
        f"{'  decode temporaries (' + m.compiler + ')':<52}{g(m.decode.temp_bytes)}",
        *([f"{'    minus float32 copies of the KV cache (CPU only)':<52}"
           f"{g(-m.decode.cpu_only_bytes)}"] if m.compiler == "XLA:CPU" else []),
        f"{'  prompt prefixes held for insert (2)':<52}{'':>9}{g(a.prefill_prefixes):>10}",
        f"{'  outputs not aliased to donated inputs':<52}"
        f"{g(m.decode.output_bytes - m.decode.alias_bytes)}",
        f"{'  total (with resident train state)':<52}{g(m.rollout_peak_bytes)}",
        "",
        f"peak {_gib(result.peak_bytes)} per device "
        f"({'train' if m.train_peak_bytes >= m.rollout_peak_bytes else 'rollout'} phase) of "
        f"{t.hbm_gib:.1f} GiB HBM -> {result.verdict} (headroom {100 * result.headroom:.1f}%)",
    ]
    if a.attention_scores > 0.1 * t.hbm_bytes:
        lines.append(f"note: attention scores take {_gib(a.attention_scores)} per device for one "
                     f"layer at {rows} row(s) of {s.train_seq} tokens (model.attention="
                     f"{m.model.attention!r}; 'auto' never materialises [T, T] scores)")
    if result.fits and result.headroom < TIGHT_HEADROOM:
        why = ("the runtime reserves and fragments some HBM" if m.compiler == "XLA:TPU" else
               "the TPU/GPU compiler's temporaries can differ from XLA:CPU's")
        lines.append(f"warning: less than {100 * TIGHT_HEADROOM:.0f}% headroom; {why}")
    hbm = t.hbm_bytes
    for phase, peak in (("train", m.train_peak_bytes), ("rollout", m.rollout_peak_bytes)):
        if peak > hbm:
            lines.append(f"{phase} phase is {_gib(peak - hbm)} over budget")
    if result.suggestions:
        lines.append("suggestions (estimated per-device saving; savings do not simply add up):")
        for x in result.suggestions:
            note = f"  [{x.note}]" if x.note else ""
            lines.append(f"  {x.phase:<8}{x.action}: -{_gib(x.saves_bytes)}{note}")
    elif not result.fits:
        lines.append("no configuration knob lowers memory enough; use a larger topology")
    if m.compiler == "XLA:TPU":
        source = (f"arguments follow from shapes and shardings (XLA:TPU pads small minor "
                  f"dimensions to its memory tiles, so its column can exceed the analytic one); "
                  f"XLA:TPU compiled both steps ahead of time for {t.name}'s {t.chips} chips "
                  "(libtpu on this machine, no TPU), so temporaries are the TPU compiler's own "
                  "buffer assignment and the kernels were compiled by Mosaic")
    else:
        source = ("arguments follow exactly from shapes and shardings; temporaries are XLA:CPU's "
                  "buffer assignment and TPU/GPU numbers differ somewhat (the float32 KV cache "
                  "copies XLA:CPU makes for bf16 scatters are left out of the totals)")
    lines += ["", f"note: {source}. The "
              "rollout phase keeps the train state on device; the trainer frees the sampler's weights "
              "and KV cache before the update, so the train phase is the update step alone."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI.


def _ensure_fake_devices(count: int) -> None:
    """Re-executes this module with `count` fake CPU devices unless the environment has them.

    XLA reads the device count once, when the backend starts, so it has to be in the environment
    of a fresh process.
    """
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAX_PLATFORMS") == "cpu" and flag in flags.split():
        return
    if os.environ.get("_DAPO_PLAN_REEXEC") == "1":
        raise RuntimeError(f"could not set up {count} fake CPU devices (XLA_FLAGS={flags!r})")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} {flag}".strip(),
               _DAPO_PLAN_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "dapo_jax.plan", *sys.argv[1:]], env)


def _stderr(message: str) -> None:
    print(f"plan: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> None:
    """CLI entry point (absl): plans `--config` on `--topology` or `--devices` + `--hbm_gib`."""
    from absl import flags
    f = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --topology=v5p-128")
    if f.config is None:
        raise UserError("--config is required, e.g. --config configs/dapo_qwen2_5_32b.py")
    topology = _topology(f.topology or None, f.devices, f.hbm_gib)
    compiler = resolve_compiler(f.compiler, topology)
    if compiler == "cpu":
        _ensure_fake_devices(topology.chips)
    else:
        # The slice's devices come from libtpu's topology description; this process's own backend
        # stays the CPU (with libtpu installed jax would otherwise look for a local TPU first).
        jax.config.update("jax_platforms", "cpu")
    try:
        result = plan(f.config, f.topology or None, devices=f.devices, hbm_gib=f.hbm_gib,
                      lower=f.lower, compiler=compiler, progress=_stderr)
    except OutOfMemory as e:
        if f.compiler == "tpu":
            raise UserError(f"{e}; rerun with --compiler=cpu for the per-device breakdown and "
                            "suggestions") from None
        # XLA:CPU compiles whatever the size: it gives the breakdown and the suggestions.
        print(f"{e}\nDOES NOT FIT. The breakdown and suggestions below come from XLA:CPU on fake "
              "devices (--compiler=cpu).\n", flush=True)
        sys.argv = [a for a in sys.argv if not a.startswith("--compiler")] + ["--compiler=cpu"]
        _ensure_fake_devices(topology.chips)
        result = plan(f.config, f.topology or None, devices=f.devices, hbm_gib=f.hbm_gib,
                      lower=f.lower, compiler="cpu", progress=_stderr)
    print(format_report(result))
    if result.lowering_failed:
        sys.exit(1)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "experiment config file (path[:arg])",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "accelerator, e.g. v5p-128, v5litepod-16, h100-80gb-x8")
    flags.DEFINE_integer("devices", None, "device count (with --hbm_gib) instead of --topology")
    flags.DEFINE_float("hbm_gib", None, "HBM per device in GiB (with --devices)")
    flags.DEFINE_enum("compiler", "auto", list(COMPILERS),
                      "what compiles the steps: 'tpu' = XLA:TPU for the slice's own devices, ahead "
                      "of time on this machine (needs libtpu: pip install "
                      f"'{cross_lowering.LIBTPU_REQUIREMENT}'); 'cpu' = XLA:CPU on one fake device "
                      "per chip; 'auto' = tpu for a TPU slice when libtpu is installed, else cpu")
    flags.DEFINE_bool("lower", True, "also lower the train and decode steps for a named TPU/GPU "
                      "topology's platform (its Pallas kernels included) on an abstract mesh of its "
                      "chips; exit status 1 when one does not lower")
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


if __name__ == "__main__":
    from absl import app
    _define_flags()
    # Bad flags, configs and topologies: `error: ...` and exit status 2, no traceback.
    app.run(lambda argv: run_cli(lambda: main(argv)), flags_parser=absl_flags_parser)
