"""Evaluation with the paper's settings: AIME 2024, 32 samples at temperature 1.0 / top-p 0.7, 20480
new tokens, the DAPO template and math_dapo reward; headline avg@32."""

from configs.base import get_base_config


def get_config(arg: str = ""):
    """`--config configs/eval_aime.py[:dataset,...]` (default aime2024)."""
    c = get_base_config()
    c.data.val = tuple(d for d in (arg or "aime2024").split(",") if d)
    c.eval.n = 32
    c.eval.temperature = 1.0
    c.eval.top_p = 0.7
    c.data.max_response_length = 20480
    c.rollout.max_concurrent_decodes = 256
    return c
