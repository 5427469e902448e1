"""Rollout generation: a JetStream-API engine, a continuous-batching driver, the backend contract."""

from dapo_jax.sampler.backend import RolloutBackend
from dapo_jax.sampler.decode_layout import (DECODE_LAYOUT_CHOICES, DECODE_LAYOUTS, DecodeLayout,
                                             resolve_decode_layout)
from dapo_jax.sampler.engine import SAMPLING_RULES, Engine, ResultTokens, prefill_buckets
from dapo_jax.sampler.paged_cache import KV_CACHE_CHOICES, KVPoolPlan, kv_pool_plan
from dapo_jax.sampler.paged_engine import PagedEngine, Preempted, build_engine
from dapo_jax.sampler.rollout import RolloutDriver, RolloutRequest, RolloutResult, Sample
from dapo_jax.sampler.sampling import SamplingParams, sample_tokens, sampling_logits



__all__ = ["Engine", "DecodeLayout", "DECODE_LAYOUTS", "DECODE_LAYOUT_CHOICES", "resolve_decode_layout",
           "ResultTokens", "RolloutBackend", "SAMPLING_RULES", "prefill_buckets", "RolloutDriver",
           "RolloutRequest", "RolloutResult", "Sample", "SamplingParams", "sample_tokens",
           "sampling_logits", "PagedEngine", "Preempted", "KV_CACHE_CHOICES", "KVPoolPlan",
           "kv_pool_plan", "build_engine"]
