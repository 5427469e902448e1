"""DAPO algorithm math (arXiv:2503.14476): pure JAX functions plus the dynamic-sampling accumulator.

* :mod:`.policy_loss`: clipped policy-gradient loss with Clip-Higher (Eq. 8-10) and loss aggregation
  (token-level, Eq. 12; GRPO / Dr. GRPO / verl-legacy alternatives).
* :mod:`.advantages`: group-relative advantages (Eq. 9).
* :mod:`.overlong`: soft overlong punishment (Eq. 13) and overlong filtering.
* :mod:`.dynamic_sampling`: group filter (Eq. 11) and the host-side accumulator.
* :mod:`.shaping`: all of the above applied to one generation batch (one pure function).

See docs/algorithm.md for the equations, verl differences and metric names.
"""

from dapo_jax.algo.advantages import compute_grpo_advantages
from dapo_jax.algo.dynamic_sampling import (
    DynamicSamplingAccumulator,
    DynamicSamplingCapError,
    FilterMetric,
    keep_groups,
    select_filter_metric,
)
from dapo_jax.algo.overlong import is_truncated, overlong_filter_mask, overlong_penalty
from dapo_jax.algo.shaping import ShapedBatch, ShapingSettings, shape_rewards
from dapo_jax.algo.policy_loss import (
    LOSS_AGG_MODES,
    aggregate_loss,
    compute_policy_loss,
    per_token_policy_loss,
    token_mean_metrics,
)

__all__ = [
    "LOSS_AGG_MODES",
    "ShapedBatch",
    "ShapingSettings",
    "shape_rewards",
    "DynamicSamplingAccumulator",
    "DynamicSamplingCapError",
    "FilterMetric",
    "aggregate_loss",
    "compute_grpo_advantages",
    "compute_policy_loss",
    "is_truncated",
    "keep_groups",
    "overlong_filter_mask",
    "overlong_penalty",
    "per_token_policy_loss",
    "select_filter_metric",
    "token_mean_metrics",
]
