"""The rollout-backend contract: what the trainer and the evaluator need from a sampler.

`RolloutDriver` (continuous batching over this package's JetStream-style `Engine`) implements it;
another engine (vLLM on TPU, a remote inference server) plugs in by implementing these three
methods and being passed as `Trainer(..., rollout=backend)`. docs/rollout_backends.md describes how.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from dapo_jax.sampler.rollout import RolloutRequest, RolloutResult
from dapo_jax.sampler.sampling import SamplingParams


@runtime_checkable
class RolloutBackend(Protocol):
    """Generates samples from the current policy; receives new weights after every update."""

    def generate(self, requests: Sequence[RolloutRequest], *, seed: int,
                 sampling: SamplingParams, desc: str = "rollout") -> RolloutResult:
        """n samples per request, in request order then sample order.

        Each `Sample` carries its tokens (the stop token included when it stopped), the policy's
        log-prob of each token at `sampling.temperature` (no top-k/top-p: the trainer's policy),
        the log-prob under the full sampling transformation, its finish reason ("eos" | "length")
        and its decoded text. The same (seed, requests, sampling, weights) give the same samples.
        """
        ...

    def update_params(self, params: Any) -> None:
        """Takes the trainer's new weights (training layout) for the next `generate`."""
        ...

    def release(self) -> None:
        """Frees what the backend holds on the accelerators until the next `update_params`."""
        ...
