"""The experiment builder: one place that turns a config into what the entry points run.

`train`, `evaluate`, `plan`, `demo` and the benchmarks take their mesh, model config, tokenizer,
stop/pad ids, loss settings, sampling settings, rollout engine and optimizer from here, so the planner
compiles the trainer's programs and evaluation decodes with the trainer's stop tokens.

The model architecture follows one rule: `model.preset` when it is set, otherwise the `config.json`
at `model.path`. `model.path` always supplies the weights when it is set; a checkpoint whose
architecture differs from the preset is an error at load time (`check_architecture`), so a planner
that only reads the preset (it never touches the checkpoint) plans the model the trainer trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from dapo_jax.config_validation import ConfigError, as_list, validate_config
from dapo_jax.models.config import ModelConfig, from_hf_config, preset
from dapo_jax.models.sharding import make_mesh
from dapo_jax.sampler.engine import Engine
from dapo_jax.sampler.paged_engine import build_engine
from dapo_jax.sampler.sampling import SamplingParams
from dapo_jax.training.batching import PackingLayout
from dapo_jax.training.batching import packing_layout as make_packing_layout
from dapo_jax.training.update import LossSettings, lr_schedule, make_optimizer

# Fields that define the architecture (a preset and a checkpoint must agree on all of them).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias",
                       "rope_theta", "rms_norm_eps")


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of `config.mesh` over the first `mesh.num_devices`."""
    m = config.mesh
    devices = list(devices if devices is not None else jax.devices())
    return make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor},
                     devices=devices[:m.num_devices or None])


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run's dtype / remat / layer-scan / attention choices, applied to any architecture."""
    m = config.model
    return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                scan_layers=bool(m.scan_layers), attention=str(m.get("attention", "auto")))


def resolve_model_config(config: ml_collections.ConfigDict, *, tokenizer_size: int | None = None
                         ) -> ModelConfig:
    """The policy's ModelConfig: `model.preset` if set, else the checkpoint's config.json.

    A randomly initialised preset (no `model.path`) embeds exactly the tokens its tokenizer has: its
    vocabulary is `model.vocab_size` when set, else `tokenizer_size` rounded up to a multiple of 64.
    """
    m = config.model
    overrides = model_overrides(config)
    if m.preset:
        if int(m.get("vocab_size", 0) or 0) > 0:
            overrides["vocab_size"] = int(m.vocab_size)
        elif tokenizer_size is not None and not m.path:
            overrides["vocab_size"] = int(math.ceil(tokenizer_size / 64) * 64)
        cfg = preset(m.preset, **overrides)
    elif m.path:
        from dapo_jax.models.hf_checkpoint import read_hf_config
        cfg = from_hf_config(read_hf_config(m.path), **overrides)
    else:
        raise ConfigError("config.model.preset and config.model.path are both empty: set "
                          "model.path to a HF checkpoint or model.preset to a size preset")
    if tokenizer_size is not None and tokenizer_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer_size} tokens but the model vocabulary is "
                          f"{cfg.vocab_size}; set config.model.vocab_size (or another preset)")
    return cfg


def check_architecture(expected: ModelConfig, loaded: ModelConfig, source: str) -> None:
    """Raises when a checkpoint's architecture differs from the configured one."""
    diff = {f: (getattr(expected, f), getattr(loaded, f)) for f in ARCHITECTURE_FIELDS
            if getattr(expected, f) != getattr(loaded, f)}
    if diff:
        detail = ", ".join(f"{k}: preset {a} vs checkpoint {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"the checkpoint at {source} is not the configured model.preset ({detail}); "
                          "set config.model.preset to the checkpoint's size or to '' (then the "
                          "checkpoint's config.json decides)")


def tokenizer_source(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                     train_records: Sequence[dict] | None = None) -> str:
    """Where the run's tokenizer is: `tokenizer.path`, else `model.path`, else the toy tokenizer
    built from the toy corpus into `<workdir>/toy_tokenizer` (process 0 writes it, the others wait)."""
    path = config.tokenizer.path or config.model.path
    if path:
        return os.fspath(path)
    if config.data.train != "toy":
        raise ConfigError("config.tokenizer.path and config.model.path are both empty: set one to a "
                          "folder with tokenizer.json (e.g. ../shared/data/tokenizers/qwen2.5)")
    import data_pipeline as dp
    from etils import epath
    from jax.experimental import multihost_utils

    path = os.fspath(epath.Path(workdir) / "toy_tokenizer")
    if jax.process_index() == 0 and not (epath.Path(path) / "tokenizer.json").exists():
        if train_records is None:  # generated, not read through the TFDS cache: only process 0 is here
            from data_pipeline import datasets
            train_records = dp.generate_toy_arithmetic(datasets.toy_config(config))["train"]
        dp.build_toy_tokenizer(path, dp.toy_corpus(train_records[:2000]))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dapo_jax: toy tokenizer written")
    return path


def stop_and_pad_ids(tokenizer: Any, stop_tokens: Sequence[str]) -> tuple[tuple[int, ...], int]:
    """(stop ids: the tokenizer's EOS plus every configured stop token it knows, pad id)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in stop_tokens:
        if tok in vocab and int(vocab[tok]) not in ids:
            ids.append(int(vocab[tok]))
    if not ids:
        raise ConfigError("no stop tokens: the tokenizer has no EOS and none of "
                          f"config.tokenizer.stop_tokens={list(stop_tokens)} is in its vocabulary")
    pad = tokenizer.pad_token_id
    return tuple(ids), int(pad if pad is not None else ids[0])


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def loss_settings(config: ml_collections.ConfigDict, mesh: Mesh) -> LossSettings:
    """The static knobs of the DAPO objective (0 means 'off' for the optional ones)."""
    a, t = config.algo, config.trainer
    dp = data_parallel_size(mesh)
    return LossSettings(
        clip_ratio_low=float(a.clip_ratio_low), clip_ratio_high=float(a.clip_ratio_high),
        clip_ratio_c=float(a.clip_ratio_c) or None, loss_agg_mode=a.loss_agg_mode,
        loss_scale_length=float(a.loss_scale_length or config.data.max_response_length),
        log_ratio_clamp=float(a.log_ratio_clamp) or None,
        num_dp_ranks=dp if t.micro_batch_size % dp == 0 else 1,
        chunk_size=int(t.logprob_chunk_size), temperature=float(config.rollout.temperature))


# Packed row lengths are multiples of this (small, so short buckets stay short; the TPU
# attention kernel pads rows to 128 itself).
PACKED_ROW_MULTIPLE = 16


def uses_packing(config: ml_collections.ConfigDict) -> bool:
    """Whether updates run on packed rows: trainer.packing, except for verl-legacy-token-mean,
    whose loss is defined by fixed-size micro-batches (it keeps the padded layout)."""
    return (bool(config.trainer.get("packing", True))
            and config.algo.loss_agg_mode != "verl-legacy-token-mean")


def token_budget(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """Tokens per data-parallel rank per packed micro-batch: trainer.max_tokens_per_micro_batch,
    or (0) the padded layout's footprint, micro_batch_size / (data x fsdp) full-length rows."""
    t = config.trainer
    if t.get("max_tokens_per_micro_batch", 0):
        return int(t.max_tokens_per_micro_batch)
    full = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    rows = max(1, int(t.micro_batch_size) // data_parallel_size(mesh))
    return rows * (-(-full // PACKED_ROW_MULTIPLE) * PACKED_ROW_MULTIPLE)


def packing_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> PackingLayout:
    """The packed micro-batch shapes (row-length buckets) of this config on `mesh`."""
    full = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    return make_packing_layout(full, token_budget(config, mesh), data_parallel_size(mesh),
                               int(config.trainer.get("packing_row_buckets", 3)),
                               multiple=PACKED_ROW_MULTIPLE,
                               trim_steps=int(config.trainer.get("packing_trim_steps", 8)))


def sampling_params(section: ml_collections.ConfigDict) -> SamplingParams:
    """SamplingParams of `config.rollout` or `config.eval`."""
    return SamplingParams(temperature=float(section.temperature), top_p=float(section.top_p),
                          top_k=int(section.top_k))


def optimizer(config: ml_collections.ConfigDict
              ) -> tuple[optax.GradientTransformation, Callable[[int], Any]]:
    """(AdamW after global-norm clipping with an injected learning rate, the lr schedule)."""
    o = config.optim
    tx = make_optimizer(weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2,
                        eps=o.eps)
    return tx, lr_schedule(o.lr, o.warmup_steps, decay=o.get("lr_schedule", "constant"),
                           total_steps=int(config.trainer.total_steps),
                           min_lr_ratio=float(o.get("min_lr_ratio", 0.0)))


def make_engine(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh, *,
                stop_ids: Sequence[int], pad_id: int, max_new_tokens: int | None = None,
                max_concurrent_decodes: int | None = None) -> Engine:
    """The rollout engine for prompts of `data.max_prompt_length` plus `max_new_tokens`."""
    r, p = config.rollout, int(config.data.max_prompt_length)
    new = int(max_new_tokens or config.data.max_response_length)
    return build_engine(model_config, kv_cache=r.get("kv_cache", "dense"),
                        kv_pool_tokens=int(r.get("kv_pool_tokens", 0)),
                        kv_page_size=int(r.get("kv_page_size", 16)),
                        prefill_row_tokens=int(r.get("prefill_row_tokens", 2048)),
                        max_concurrent_decodes=int(max_concurrent_decodes
                                                   or r.max_concurrent_decodes),
                        max_prefill_length=p, max_target_length=p + new,
                        stop_token_ids=list(stop_ids), pad_token_id=pad_id, mesh=mesh,
                        cache_dtype=r.cache_dtype, decode_layout=r.decode_layout)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a training or evaluation run is made of, derived from one config."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model_config: ModelConfig
    tokenizer: Any
    tokenizer_dir: str
    stop_ids: tuple[int, ...]
    pad_id: int
    loss: LossSettings
    train_sampling: SamplingParams
    eval_sampling: SamplingParams

    @property
    def prompt_length(self) -> int:
        """Longest prompt (tokens)."""
        return int(self.config.data.max_prompt_length)

    @property
    def response_length(self) -> int:
        """Longest response (tokens): L_max of the overlong shaping."""
        return int(self.config.data.max_response_length)

    def optimizer(self) -> tuple[optax.GradientTransformation, Callable[[int], Any]]:
        """(optimizer, lr schedule) of `config.optim`."""
        return optimizer(self.config)

    def engine(self, *, max_new_tokens: int | None = None) -> Engine:
        """A rollout engine on this experiment's mesh with its stop and pad ids."""
        return make_engine(self.config, self.model_config, self.mesh, stop_ids=self.stop_ids,
                           pad_id=self.pad_id, max_new_tokens=max_new_tokens)


def build(config: ml_collections.ConfigDict, *, workdir: str | os.PathLike | None = None,
          tokenizer_dir: str | os.PathLike | None = None,
          train_records: Sequence[dict] | None = None,
          devices: Sequence[jax.Device] | None = None, mesh: Mesh | None = None,
          model_config: ModelConfig | None = None, validated: bool = False) -> Experiment:
    """Validates `config` (once, here) and builds the experiment.

    The tokenizer is `tokenizer_dir` when given, else the config's (`tokenizer_source()`, which may build
    the toy tokenizer into `workdir`). `model_config` overrides the config's architecture (evaluating
    a checkpoint that records its own); otherwise `resolve_model_config` decides. `validated=True`
    when the caller already ran `validate_config` (the trainer does it first, before loading data).
    """
    from dapo_jax.models.tokenizer import load_tokenizer

    if not validated:
        n = len(devices) if devices is not None else (mesh.size if mesh is not None
                                                       else jax.device_count())
        validate_config(config, n, training=model_config is None)
    mesh = mesh if mesh is not None else mesh_from_config(config, devices)
    if tokenizer_dir is None:
        if workdir is None:
            raise ValueError("experiment.build needs tokenizer_dir or a workdir to find it in")
        tokenizer_dir = tokenizer_source(config, workdir, train_records)
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = model_config or resolve_model_config(config, tokenizer_size=len(tokenizer))
    stop_ids, pad_id = stop_and_pad_ids(tokenizer, as_list(config.tokenizer.stop_tokens))
    return Experiment(config=config, mesh=mesh, model_config=cfg, tokenizer=tokenizer,
                      tokenizer_dir=os.fspath(tokenizer_dir), stop_ids=stop_ids, pad_id=pad_id,
                      loss=loss_settings(config, mesh), train_sampling=sampling_params(config.rollout),
                      eval_sampling=sampling_params(config.eval))
