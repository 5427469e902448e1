"""The DAPO paper's run: Qwen2.5-32B base on DAPO-Math-17k, validated on AIME 2024 (avg@32).

Paper Sec. 4.1: AdamW lr 1e-6 with linear warmup, prompt batch 512 x 16 samples, mini-batch 512
samples (16 gradient updates per rollout step), Clip-Higher 0.2/0.28, token-level loss, max response
20480 tokens with a 4096-token overlong buffer, dynamic sampling, no KL. Sized for a TPU v5p-128 slice.
`--config configs/dapo_qwen2_5_32b.py:<stage>` picks a Table 1 ablation stage.
"""

from configs.base import apply_ablation, get_base_config


def get_config(arg: str = "dapo"):
    """Qwen2.5-32B DAPO (the paper's configuration)."""
    c = get_base_config()
    c.model.path = "gs://YOUR_BUCKET/models/Qwen2.5-32B"
    c.model.preset = "qwen2.5-32b"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 8
    c.data.train = "gs://YOUR_BUCKET/data/dapo-math-17k.parquet"
    c.data.val = ("gs://YOUR_BUCKET/data/aime-2024.parquet",)
    c.data.max_prompt_length = 2048
    c.data.max_response_length = 20480
    c.algo.overlong_buffer.len = 4096
    c.rollout.n = 16
    c.rollout.max_concurrent_decodes = 512
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.trainer.train_batch_size = 512
    c.trainer.gen_batch_size = 1536
    c.trainer.mini_batch_size = 512
    c.trainer.micro_batch_size = 8
    # Packed micro-batches of four full-length rows' worth of tokens per device (see dapo_jax.plan).
    c.trainer.max_tokens_per_micro_batch = 90112
    c.trainer.total_steps = 400
    c.trainer.test_freq = 5
    c.eval.n = 32
    c.eval.top_p = 0.7
    return apply_ablation(c, arg or "dapo")
