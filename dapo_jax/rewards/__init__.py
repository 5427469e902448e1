"""Rule-based rewards for math answers: DAPO's exact rule, an opt-in symbolic one, a batch scorer."""
from dapo_jax.rewards.batch import available_scorers, get_scorer, register_scorer, score_batch
from dapo_jax.rewards.math_dapo import ScoreResult, compute_score, normalize_final_answer

__all__ = [
    "ScoreResult",
    "available_scorers",
    "compute_score",
    "get_scorer",
    "normalize_final_answer",
    "register_scorer",
    "score_batch",
]
