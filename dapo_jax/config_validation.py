"""Validation of experiment configs: fail early with a message that names the field and the fix."""

from __future__ import annotations

import ml_collections

from dapo_jax.algo import LOSS_AGG_MODES
from dapo_jax.models.config import ATTENTION_IMPLEMENTATIONS, DTYPES, PRESETS, REMAT_POLICIES
from dapo_jax.runtime.cli_errors import UserError
from dapo_jax.runtime.mesh_config import mesh_sizes
from dapo_jax.sampler.decode_layout import DECODE_LAYOUT_CHOICES
from dapo_jax.sampler.paged_cache import KV_CACHE_CHOICES, pages_for


class ConfigError(UserError):
    """A config value is invalid; the message names the key and how to fix it."""


LIST_FIELDS = ("data.val", "tokenizer.stop_tokens")
LR_SCHEDULES = ("constant", "cosine", "linear")
TRUNCATION_MODES = ("left", "right", "error")


def as_list(value) -> list[str]:
    """A list field as given in a config file (list/tuple) or on the command line: every entry split
    at commas, blanks dropped, so `--config.data.val=aime2024,math500` names two datasets."""
    items = [value] if isinstance(value, str) else list(value or ())
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def normalize_lists(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Rewrites the LIST_FIELDS of `c` in place as tuples of single entries (see `as_list`).

    ml_collections cannot override list fields from the command line; tuple fields it parses as one
    string (`('aime2024,math500',)`) or a Python literal. validate_config calls it; code reading
    these fields goes through `as_list`, which also reads a field a config declared as a string.
    """
    for key in LIST_FIELDS:
        section, field = key.split(".")
        if section in c and field in c[section]:
            try:
                c[section][field] = tuple(as_list(c[section][field]))
            except TypeError:  # a str-typed field stays a string; readers go through as_list
                pass
    return c


def _check(cond: bool, key: str, msg: str, problems: list[str]) -> None:
    if not cond:
        problems.append(f"config.{key}: {msg}")


def validate_config(c: ml_collections.ConfigDict, num_devices: int | None = None, *,
                    training: bool = True) -> None:
    """Raises ConfigError listing every invalid field of a config.

    `training=False` checks what evaluating a checkpoint reads (its architecture comes from the
    checkpoint; the algorithm, trainer and optimizer sections are not used).
    """
    normalize_lists(c)
    p: list[str] = []
    if training:
        _check(bool(c.model.path) or bool(c.model.preset), "model",
               "model.path and model.preset are both empty: set model.path to a HF checkpoint or "
               f"model.preset to one of {sorted(PRESETS)}", p)
    _check(not c.model.preset or c.model.preset.lower() in PRESETS, "model.preset",
           f"unknown preset {c.model.preset!r}; choose one of {sorted(PRESETS)} (or '' to take "
           "the architecture from model.path)", p)
    for key in ("param_dtype", "dtype"):
        _check(c.model[key] in DTYPES, f"model.{key}", f"must be one of {DTYPES}", p)
    _check(c.rollout.cache_dtype in DTYPES, "rollout.cache_dtype", f"must be one of {DTYPES}", p)
    _check(c.rollout.get("decode_layout", "auto") in DECODE_LAYOUT_CHOICES, "rollout.decode_layout",
           f"must be one of {list(DECODE_LAYOUT_CHOICES)}", p)
    kv_cache = c.rollout.get("kv_cache", "dense")
    _check(kv_cache in KV_CACHE_CHOICES, "rollout.kv_cache",
           f"must be one of {list(KV_CACHE_CHOICES)} (paged = a pool of pages shared by the slots; "
           "dense = every slot reserves max_target_length positions)", p)
    page, pool = int(c.rollout.get("kv_page_size", 16)), int(c.rollout.get("kv_pool_tokens", 0))
    _check(page >= 1, "rollout.kv_page_size", f"must be >= 1 (tokens per KV page), got {page}; "
           "16 is a good default", p)
    row = int(c.rollout.get("prefill_row_tokens", 2048))
    _check(row >= 1, "rollout.prefill_row_tokens", f"must be >= 1 (tokens per packed prefill "
           f"row), got {row}; 2048 is a good default", p)
    if kv_cache == "paged" and page >= 1:
        longest = int(c.data.max_prompt_length) + int(c.data.max_response_length)
        need = pages_for(longest, page) * page
        _check(pool == 0 or pool >= need, "rollout.kv_pool_tokens",
               f"must be 0 (default: every slot can reach full length) or hold at least one sample "
               f"of data.max_prompt_length + data.max_response_length = {longest} tokens in pages "
               f"of {page}; set it to >= {need}, got {pool}", p)
    for old in ("per_layer_weights", "out_major_weights"):
        _check(c.rollout.get(old) is None, f"rollout.{old}",
               "was replaced by rollout.decode_layout; delete it and set rollout.decode_layout to one "
               f"of {list(DECODE_LAYOUT_CHOICES)} ('auto' = per-layer weights, [out, in] kernels on "
               "CPU only)", p)
    _check(c.model.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}", p)
    _check(c.model.get("attention", "auto") in ATTENTION_IMPLEMENTATIONS, "model.attention",
           f"must be one of {ATTENTION_IMPLEMENTATIONS} (auto picks by platform)", p)
    d = c.data
    _check(d.max_prompt_length > 0, "data.max_prompt_length", "must be positive", p)
    _check(d.max_response_length > 0, "data.max_response_length", "must be positive", p)
    _check(d.get("truncation", "left") in TRUNCATION_MODES, "data.truncation",
           f"must be one of {TRUNCATION_MODES} (left = keep the prompt's end, right = its "
           "beginning, error = stop when a prompt is longer than data.max_prompt_length)", p)
    if training:
        _check_training(c, num_devices, p)
    _check(c.reward.scorer in ("math_dapo", "math_verify"), "reward.scorer",
           "must be 'math_dapo' or 'math_verify'", p)
    fn = c.reward.get("fn", "")
    _check(not fn or (isinstance(fn, str) and fn.count(":") == 1 and all(fn.split(":"))),
           "reward.fn", f"must be '' or 'package.module:function', got {fn!r}", p)
    _check(isinstance(c.reward.boxed_fallback, bool), "reward.boxed_fallback",
           f"must be True or False, got {c.reward.boxed_fallback!r}", p)
    _check(0 < c.eval.top_p <= 1, "eval.top_p", "must be in (0, 1]", p)
    _check(c.eval.n >= 1, "eval.n", "must be >= 1", p)
    if p:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(p))


def _check_training(c: ml_collections.ConfigDict, num_devices: int | None, p: list[str]) -> None:
    """The algorithm, batch, mesh, optimizer and warm-start fields a training run reads."""
    t, a, r, d = c.trainer, c.algo, c.rollout, c.data
    _check(r.n >= 1, "rollout.n", "must be >= 1 (samples per prompt)", p)
    _check(r.n >= 2 or not a.dynamic_sampling.enable, "rollout.n",
           "dynamic sampling needs groups of >= 2 samples; raise rollout.n or disable "
           "algo.dynamic_sampling.enable", p)
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", p)
    _check(r.temperature > 0, "rollout.temperature",
           "must be > 0: RL needs sampled rollouts (the policy is softmax(logits / temperature))", p)
    _check(r.max_concurrent_decodes >= 1, "rollout.max_concurrent_decodes", "must be >= 1", p)
    _check(0 < r.max_new_tokens <= d.max_response_length, "rollout.max_new_tokens",
           f"must be in [1, data.max_response_length={d.max_response_length}]", p)
    _check(t.total_steps >= 1, "trainer.total_steps", "must be >= 1", p)
    _check(t.train_batch_size >= 1, "trainer.train_batch_size", "must be >= 1", p)
    _check(t.gen_batch_size >= 1, "trainer.gen_batch_size", "must be >= 1", p)
    _check(a.dynamic_sampling.enable or t.gen_batch_size == t.train_batch_size,
           "trainer.gen_batch_size", f"without dynamic sampling every generated group is trained on, "
           f"so gen_batch_size must equal train_batch_size ({t.train_batch_size})", p)
    samples = t.train_batch_size * r.n
    _check(t.mini_batch_size >= 1 and samples % t.mini_batch_size == 0, "trainer.mini_batch_size",
           f"must divide train_batch_size * rollout.n = {samples} samples (the paper: 512 prompts x 16 "
           "= 8192 samples, mini-batch 512 = 16 updates per step)", p)
    _check(t.micro_batch_size >= 1 and t.mini_batch_size % max(t.micro_batch_size, 1) == 0,
           "trainer.micro_batch_size", f"must divide trainer.mini_batch_size ({t.mini_batch_size})", p)
    if num_devices:
        try:
            sizes = mesh_sizes(c.mesh, num_devices)
        except UserError as e:  # axes that cannot tile the devices: say so, not a size downstream
            p.append(str(e))
            sizes = None
        if sizes is not None:
            n = c.mesh.num_devices or num_devices
            dp = sizes["data"] * sizes["fsdp"]
            _check(t.micro_batch_size % dp == 0, "trainer.micro_batch_size",
                   f"must be a multiple of the data-parallel size data*fsdp = {dp} (mesh {sizes} "
                   f"on {n} devices): each device gets micro_batch_size / {dp} rows", p)
    _check(a.loss_agg_mode in LOSS_AGG_MODES, "algo.loss_agg_mode", f"must be one of {LOSS_AGG_MODES}",
           p)
    full = d.max_prompt_length + d.max_response_length
    budget = t.get("max_tokens_per_micro_batch", 0)
    _check(budget == 0 or budget >= -(-full // 16) * 16, "trainer.max_tokens_per_micro_batch",
           f"must hold one full-length sample: at least data.max_prompt_length + "
           f"data.max_response_length = {full} tokens rounded up to a multiple of 16 "
           f"({-(-full // 16) * 16}), or 0 for micro_batch_size full-length rows per device", p)
    _check(t.get("packing_row_buckets", 3) >= 1, "trainer.packing_row_buckets",
           "must be >= 1 (row lengths max, max/2, ...: one compiled update program each)", p)
    _check(t.get("packing_trim_steps", 8) >= 1, "trainer.packing_trim_steps",
           "must be >= 1 (rows are cut to multiples of bucket / packing_trim_steps; 1 = never)", p)
    _check(0 <= a.clip_ratio_low < 1, "algo.clip_ratio_low", "must be in [0, 1)", p)
    _check(a.clip_ratio_high >= 0, "algo.clip_ratio_high", "must be >= 0", p)
    _check(a.clip_ratio_c == 0 or a.clip_ratio_c > 1, "algo.clip_ratio_c",
           "must be > 1 (dual-clip bound) or 0 to disable", p)
    if a.overlong_buffer.enable:
        _check(0 < a.overlong_buffer.len < d.max_response_length, "algo.overlong_buffer.len",
               f"must be in (0, data.max_response_length={d.max_response_length})", p)
    _check(a.dynamic_sampling.metric in ("acc", "score"), "algo.dynamic_sampling.metric",
           "must be 'acc' or 'score'", p)
    _check(a.dynamic_sampling.on_cap in ("error", "proceed"), "algo.dynamic_sampling.on_cap",
           "must be 'error' or 'proceed'", p)
    _check(a.dynamic_sampling.max_num_gen_batches >= 0, "algo.dynamic_sampling.max_num_gen_batches",
           "must be >= 0 (0 = unlimited)", p)
    _check(c.optim.lr > 0, "optim.lr", "must be > 0", p)
    o = c.optim
    schedule = o.get("lr_schedule", "constant")
    _check(schedule in LR_SCHEDULES, "optim.lr_schedule",
           f"must be one of {LR_SCHEDULES} (the decay after optim.warmup_steps), got {schedule!r}", p)
    _check(0.0 <= o.get("min_lr_ratio", 0.0) <= 1.0, "optim.min_lr_ratio",
           "must be in [0, 1] (the final lr of a cosine/linear schedule as a share of optim.lr)", p)
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", p)
    _check(schedule == "constant" or o.warmup_steps < t.total_steps, "optim.warmup_steps",
           f"must be < trainer.total_steps ({t.total_steps}) for a {schedule} decay to happen", p)
    lg = c.get("logging")
    if lg is not None:
        _check(isinstance(lg.get("wandb_project", ""), str), "logging.wandb_project",
               "must be a W&B project name, or '' for no W&B logging", p)
    _check(t.save_every >= 1, "trainer.save_every", "must be >= 1", p)
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1", p)
    ws = c.get("warm_start")
    if ws is not None:
        _check(0.0 <= ws.format_noise <= 1.0, "warm_start.format_noise",
               "must be in [0, 1] (share of warm-start draws with an unreadable bare answer)", p)
        _check(ws.steps == 0 or (ws.batch_size >= 1 and ws.lr > 0), "warm_start",
               "with warm_start.steps > 0, batch_size must be >= 1 and lr > 0", p)
