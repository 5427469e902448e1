"""Rollout generation: a JetStream-API engine, a continuous-batching driver, the backend contract."""

from dapo_jax.sampler.backend import RolloutBackend
from dapo_jax.sampler.engine import (OUT_MAJOR_CHOICES, SAMPLING_RULES, Engine, ResultTokens,
                                      out_major_option, prefill_buckets)
from dapo_jax.sampler.rollout import RolloutDriver, RolloutRequest, RolloutResult, Sample
from dapo_jax.sampler.sampling import SamplingParams, sample_tokens, sampling_logits

__all__ = ["Engine", "OUT_MAJOR_CHOICES", "out_major_option", "ResultTokens", "RolloutBackend",
           "SAMPLING_RULES", "prefill_buckets", "RolloutDriver", "RolloutRequest", "RolloutResult",
           "Sample", "SamplingParams", "sample_tokens", "sampling_logits"]
