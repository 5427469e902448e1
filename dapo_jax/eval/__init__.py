"""Evaluation: sampled-answer metrics (avg@k, pass@k, maj@k) and on-disk reports."""
from dapo_jax.eval.metrics import (
    avg_at_k,
    evaluation_metrics,
    k_values,
    majority_vote,
    mean_pass_at_k,
    pass_at_k,
    response_length_stats,
)
from dapo_jax.eval.report import read_problems_jsonl, score_responses_file, write_report

__all__ = [
    "avg_at_k",
    "evaluation_metrics",
    "k_values",
    "majority_vote",
    "mean_pass_at_k",
    "pass_at_k",
    "read_problems_jsonl",
    "response_length_stats",
    "score_responses_file",
    "write_report",
]
