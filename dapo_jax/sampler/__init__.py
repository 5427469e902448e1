"""Rollout generation: a JetStream-API engine and a continuous-batching driver."""

from dapo_jax.sampler.engine import SAMPLING_RULES, Engine, ResultTokens, prefill_buckets
from dapo_jax.sampler.rollout import RolloutDriver, RolloutRequest, RolloutResult, Sample
from dapo_jax.sampler.sampling import SamplingParams, sample_tokens, sampling_logits

__all__ = ["Engine", "ResultTokens", "SAMPLING_RULES", "prefill_buckets", "RolloutDriver",
           "RolloutRequest", "RolloutResult", "Sample", "SamplingParams", "sample_tokens",
           "sampling_logits"]
