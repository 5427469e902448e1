"""A smaller DAPO run: Qwen2.5-7B base (or Qwen2.5-Math-7B with `:math` / `:math,<stage>`)."""

from configs.base import apply_ablation, get_base_config


def get_config(arg: str = "dapo"):
    """Qwen2.5-7B DAPO; fits a TPU v5p-32 / v6e-32 or 8 x H100."""
    parts = [p for p in (arg or "").split(",") if p]
    math = "math" in parts
    stages = [p for p in parts if p != "math"]
    c = get_base_config()
    name = "Qwen2.5-Math-7B" if math else "Qwen2.5-7B"
    c.model.path = f"gs://YOUR_BUCKET/models/{name}"
    c.model.preset = "qwen2.5-math-7b" if math else "qwen2.5-7b"
    c.mesh.tensor = 4
    c.data.train = "gs://YOUR_BUCKET/data/dapo-math-17k.parquet"
    c.data.val = ("gs://YOUR_BUCKET/data/aime-2024.parquet",)
    # Qwen2.5-Math has a 4k context: keep prompt + response inside it.
    c.data.max_prompt_length = 1024 if math else 2048
    c.data.max_response_length = 3072 if math else 8192
    c.algo.overlong_buffer.len = 512 if math else 2048
    c.rollout.n = 16
    c.rollout.max_concurrent_decodes = 512
    c.trainer.train_batch_size = 512
    c.trainer.gen_batch_size = 1536
    c.trainer.mini_batch_size = 512
    c.trainer.micro_batch_size = 64
    # Packed micro-batches of eight full-length rows' worth of tokens per device: fits a v5p-32,
    # a v6e-32 and 8 x H100-80GB (python -m dapo_jax.plan; docs/plan.md).
    c.trainer.max_tokens_per_micro_batch = 81920
    c.trainer.total_steps = 300
    return apply_ablation(c, stages[0] if stages else "dapo")
