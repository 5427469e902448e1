"""The full configuration schema with defaults: every experiment config starts from `get_base_config()`.

Defaults are the DAPO paper's (arXiv 2503.14476, Sec. 4.1) where the paper states a value. Derived
values are FieldReferences, so `--config.data.max_response_length=...` also moves the rollout
budget and the overlong-penalty interval.
"""

from __future__ import annotations

import ml_collections

# Table 1 of the paper: each stage adds one technique to the previous one.
ABLATION_STAGES = ("naive_grpo", "overlong_filter", "clip_higher", "soft_overlong", "token_level",
                   "dapo")


def get_base_config() -> ml_collections.ConfigDict:
    """All fields with defaults (the paper's DAPO settings for the algorithm)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Policy model. The architecture is `preset` when set, else the config.json at `path`; `path`
    # (a HF checkpoint directory, local or gs://) supplies the weights, else they are random.
    # With both set, the checkpoint must be the preset's architecture (checked at load).
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.preset = ""
    c.model.param_dtype = "float32"  # parameter storage (AdamW state follows it)
    c.model.dtype = "bfloat16"  # matmul / activation dtype
    c.model.remat = "full"  # none | full | dots
    c.model.scan_layers = True
    # Attention without a [T, T] score matrix: auto = splash kernel on TPU, Pallas/Triton kernel on
    # GPU, blockwise online softmax on CPU; or force dense | blockwise | splash | pallas_gpu.
    c.model.attention = "auto"
    c.model.vocab_size = 0  # preset override (0 = keep); the toy sets it from its tokenizer

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # defaults to model.path
    # Plus the tokenizer's EOS. Lists are tuples so the command line can set them:
    # --config.tokenizer.stop_tokens='<|im_end|>,<|endoftext|>' (comma-separated; see data.val).
    c.tokenizer.stop_tokens = ("<|im_end|>", "<|endoftext|>")

    # Device mesh; -1 absorbs the remaining devices. Training and sampling share it.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # use the first N devices (0 = all), e.g. 1 for quick CPU runs

    c.data = ml_collections.ConfigDict()
    c.data.train = "toy"  # "toy", a DAPO parquet file/folder, or a JSONL problem file
    # Datasets evaluated every trainer.test_freq steps. On the command line a comma-separated list,
    # --config.data.val=aime2024,math500 (or "('aime2024', 'math500')"); each entry is split at commas.
    c.data.val = ("toy",)
    c.data.template = "dapo"  # prompt template for bare problems (JSONL / toy): dapo | short
    c.data.system_prompt = ml_collections.config_dict.placeholder(str)  # None = no system message
    c.data.apply_chat_template = True
    c.data.max_prompt_length = 2048
    # Prompts longer than max_prompt_length (each batch with some logs a warning with the count), as
    # verl's data.truncation: left = keep the last tokens (the question's end and the generation
    # prompt), right = keep the first tokens, error = stop with the count.
    c.data.truncation = "left"
    c.data.max_response_length = 20480
    c.data.num_epochs = 0  # 0 = repeat forever (the step count decides)
    c.data.shuffle = True
    c.data.cache_dir = ""  # TFDS array_record cache of train/val sets; empty = <workdir>/tfds (evaluate: <out>/tfds)
    c.data.toy = ml_collections.ConfigDict()
    c.data.toy.num_train = 4000
    c.data.toy.num_heldout = 200
    c.data.toy.min_operands = 2
    c.data.toy.max_operands = 2
    c.data.toy.min_digits = 1
    c.data.toy.max_digits = 2
    c.data.toy.operators = "+-"
    # Fixed-shape problem kinds instead of the knobs above, e.g. "3+3,2*1" (3-digit + 3-digit and
    # 2-digit x 1-digit); "" = the knobs.
    c.data.toy.kinds = ""

    c.rollout = ml_collections.ConfigDict()
    c.rollout.n = 16  # samples per prompt (group size G)
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.max_new_tokens = c.data.get_ref("max_response_length")
    c.rollout.max_concurrent_decodes = 256  # decode slots
    c.rollout.steps_per_sync = 16  # decode steps per host round-trip
    c.rollout.cache_dtype = "bfloat16"
    # How the sampler holds the weights for decoding (dapo_jax/sampler/decode_layout.py); every layout
    # draws the same tokens. "per_layer_out_major" | "per_layer" | "stacked_out_major" | "stacked":
    # per_layer = one weight array per layer (no per-layer slice copies; compile time linear in
    # depth), stacked = layers stacked as in training (scanned); out_major = kernels stored [out, in],
    # every decode matmul computes W x^T (1.6x faster decode steps at small batch on XLA:CPU,
    # docs/benchmarks.md). "auto" = per_layer_out_major on CPU meshes, per_layer on GPU/TPU.
    c.rollout.decode_layout = "auto"
    # KV cache (dapo_jax/sampler/paged_engine.py, docs/rollout_backends.md): "paged" = one pool of
    # pages shared by all decode slots, taken as samples grow and returned when they finish; a
    # prompt's n samples share its pages; each decode step reads only the pages in use. "dense" =
    # every slot reserves max_target_length positions and every step reads all of them.
    c.rollout.kv_cache = "paged"
    c.rollout.kv_pool_tokens = 0  # pool size in tokens; 0 = slots x max length (never preempts)
    c.rollout.kv_page_size = 16  # tokens per page
    # Paged cache: prompts are prefilled packed, several per call, in rows of this many tokens
    # (raised to data.max_prompt_length if smaller), each row padded only to its power-of-two
    # bucket; the dense cache prefills one prompt per call, padded to its own bucket.
    c.rollout.prefill_row_tokens = 2048

    c.algo = ml_collections.ConfigDict()
    c.algo.clip_ratio_low = 0.2
    c.algo.clip_ratio_high = 0.28  # Clip-Higher
    c.algo.clip_ratio_c = 10.0  # dual-clip (verl recipe); 0 disables (the paper's Eq. 10 exactly)
    c.algo.loss_agg_mode = "token-mean"  # Eq. 12
    c.algo.loss_scale_length = 0  # seq-mean-token-sum-norm divisor; 0 = max_response_length
    c.algo.log_ratio_clamp = 0.0  # 0 = off
    c.algo.adv_eps = 1e-6
    c.algo.norm_adv_by_std = True  # False = Dr.GRPO
    c.algo.overlong_filter = True  # mask truncated samples out of the loss (Sec. 3.4)
    c.algo.overlong_buffer = ml_collections.ConfigDict()
    c.algo.overlong_buffer.enable = True  # soft overlong punishment, Eq. 13
    c.algo.overlong_buffer.len = 4096  # L_cache
    c.algo.overlong_buffer.penalty_factor = 1.0
    c.algo.dynamic_sampling = ml_collections.ConfigDict()
    c.algo.dynamic_sampling.enable = True  # Eq. 11
    c.algo.dynamic_sampling.metric = "acc"  # acc | score
    c.algo.dynamic_sampling.max_num_gen_batches = 10  # 0 = unlimited
    c.algo.dynamic_sampling.on_cap = "error"  # error | proceed
    c.algo.dynamic_sampling.carry_over = True  # verl discards surplus groups (False)

    c.reward = ml_collections.ConfigDict()
    c.reward.scorer = "math_dapo"  # math_dapo | math_verify
    # A custom reward instead of the scorer: "package.module:function" taking (texts, ground_truths)
    # and returning [{"score", "acc", ...}] (dapo_jax/rewards/custom.py). Empty = the scorer.
    c.reward.fn = ""
    c.reward.num_workers = 0  # 0 = auto (process pool for large batches)
    # No `Answer:` line: score the last \boxed{} of the final 100 chars (raw match), as verl's
    # math_dapo does since verl 0.9.1. False = the DAPO paper's scorer. math_verify reads the box
    # either way.
    c.reward.boxed_fallback = False

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10  # linear warmup: step s (from 0) trains at lr * (s + 1) / warmup_steps
    # After the warmup: constant (the paper) | cosine | linear decay to lr * min_lr_ratio at the
    # last step (trainer.total_steps).
    c.optim.lr_schedule = "constant"
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.trainer = ml_collections.ConfigDict()
    c.trainer.total_steps = 100  # optimizer-side training steps (not generation batches)
    c.trainer.train_batch_size = 512  # prompt groups per training step
    c.trainer.gen_batch_size = 1536  # prompts per generation batch (dynamic sampling draws more)
    c.trainer.mini_batch_size = 512  # samples per optimizer update
    c.trainer.micro_batch_size = 16  # samples per gradient-accumulation micro-batch
    # Packed updates (the default): samples end to end in rows, no padding to the maximum length;
    # a micro-batch is a token budget per data-parallel rank (verl's ppo_max_token_len_per_gpu),
    # 0 = micro_batch_size / (data x fsdp) full-length rows. Rows come in packing_row_buckets
    # lengths (max, max/2, max/4, ...): one compiled program each. micro_batch_size then only sets
    # that default; verl-legacy-token-mean always uses padded micro-batches of micro_batch_size.
    c.trainer.packing = True
    c.trainer.max_tokens_per_micro_batch = 0
    c.trainer.packing_row_buckets = 3
    # Rows may then be cut to a multiple of bucket / packing_trim_steps tokens (and of 16) when that
    # computes fewer token slots: short samples do not pay for the bucket's length. At most
    # packing_trim_steps lengths (compiled programs) per bucket; 1 = rows keep the bucket's length.
    c.trainer.packing_trim_steps = 8
    # Sequence chunk for the vocab projection: memory is [rows, chunk, vocab] float32 logits, and
    # only chunks holding response tokens are projected (prompts cost no logits).
    c.trainer.logprob_chunk_size = 1024
    c.trainer.save_every = 10
    c.trainer.keep_checkpoints = 3
    c.trainer.async_checkpointing = True
    c.trainer.test_freq = 5  # validation every N steps (0 = off)
    c.trainer.val_before_train = True
    c.trainer.peak_flops_per_device = 0.0  # for MFU; 0 = look up by device kind
    c.trainer.export_hf_on_finish = False
    # Persistent XLA compilation cache (dapo_jax/runtime/compile_cache.py): a restart after a
    # preemption loads its compiled programs. "auto" = <workdir>/xla_cache unless JAX already has
    # one (JAX_COMPILATION_CACHE_DIR); a path (local or gs://); "" = none from dapo_jax.
    c.trainer.compilation_cache_dir = "auto"

    # Supervised warm start from worked solutions (toy demo only: the policy starts from random weights).
    c.warm_start = ml_collections.ConfigDict()
    c.warm_start.steps = 0
    c.warm_start.batch_size = 64
    c.warm_start.lr = 3e-3
    # Share of warm-start draws whose target is a bare "So the result is N." (unreadable by the DAPO
    # reward) instead of the worked solution ending in the "Answer: N" line.
    c.warm_start.format_noise = 0.0

    # Optional Weights & Biases logging, beside metrics/ and TensorBoard, with the same metric names.
    # Off while wandb_project is empty; needs `pip install 'dapo_jax[wandb]'` (imported only when set).
    # A resumed run continues the same W&B run (its id is kept in <workdir>/run/wandb_id).
    c.logging = ml_collections.ConfigDict()
    c.logging.wandb_project = ""
    c.logging.wandb_entity = ""  # "" = your default entity
    c.logging.wandb_name = ""  # "" = the workdir's name

    c.eval = ml_collections.ConfigDict()
    c.eval.n = 32  # samples per problem: avg@32
    c.eval.temperature = 1.0
    c.eval.top_p = 0.7
    c.eval.top_k = 0
    c.eval.max_new_tokens = c.data.get_ref("max_response_length")
    c.eval.max_problems = 0  # 0 = all
    return c


def apply_ablation(c: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """Configures the paper's Table 1 ladder: naive GRPO, then each technique added in turn."""
    if stage not in ABLATION_STAGES:
        raise ValueError(f"Unknown ablation stage {stage!r}; choose one of {ABLATION_STAGES}")
    level = ABLATION_STAGES.index(stage)
    c.algo.overlong_filter = level >= 1
    c.algo.clip_ratio_high = 0.28 if level >= 2 else c.algo.clip_ratio_low
    c.algo.overlong_buffer.enable = level >= 3
    c.algo.loss_agg_mode = "token-mean" if level >= 4 else "seq-mean-token-mean"
    c.algo.dynamic_sampling.enable = level >= 5
    return c
