"""Supervised warm start: a few steps of next-token training on worked solutions (the toy demo).

DAPO starts from a base model that already follows the answer format; the toy policy starts from
random weights, so the demo first teaches it the format with code-generated solutions.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from data_pipeline.toy_arithmetic import toy_worked_solution
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.logprobs import sequence_logprobs
from dapo_jax.models.qwen2 import Params

log = logging.getLogger(__name__)


def warm_start_examples(records: Sequence[dict], *, format_noise: float
                        ) -> tuple[list[int], list[str], list[float]]:
    """Toy warm-start targets as (record index, response text, sampling weight) lists.

    Every record gets its worked solution (weight 1 - format_noise) and, when format_noise > 0, a
    bare "So the result is N." (weight format_noise) that the DAPO rule cannot read, so RL has to
    discover the rewarded `Answer:` format. Mixing per draw keeps every problem's worked solution in
    the data. The bare answer shares no worked steps with the real solutions: penalising it
    (negative advantage on all its tokens) does not also push down correct arithmetic, which a
    variant that only swapped the last line did.
    """
    if not 0.0 <= format_noise <= 1.0:
        raise ValueError(f"warm_start.format_noise={format_noise}: must be in [0, 1]")
    index, texts, weights = [], [], []
    for i, r in enumerate(records):
        if format_noise < 1.0:
            index.append(i)
            texts.append(toy_worked_solution(r))
            weights.append(1.0 - format_noise)
        if format_noise > 0.0:
            index.append(i)
            texts.append(f"So the result is {r['ground_truth']}.")
            weights.append(format_noise)
    return index, texts, weights


def pack_sft_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded [prompt | response] rows with a loss mask on response tokens."""
    n = len(prompts)
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    target = np.zeros((n, length), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = (list(p) + list(r))[:length]
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        target[i, len(p):len(seq)] = 1
    return ids, mask, target


def supervised_warm_start(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]], *, steps: int, batch_size: int,
                          lr: float, seed: int, pad_id: int,
                          weights: Sequence[float] | None = None,
                          progress: bool = True) -> tuple[Params, list[float]]:
    """Trains on (prompt, response) pairs with AdamW + cosine decay; returns (params, losses).

    Batches are drawn with replacement, in proportion to `weights` when given.
    """
    probs = None
    if weights is not None:
        if len(weights) != len(prompts) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("weights must be one non-negative number per example, not all zero")
        probs = np.asarray(weights, np.float64) / np.sum(weights)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.1),
                     weight_decay=0.0)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask, target):
        def loss_fn(p):
            lp, _ = sequence_logprobs(p, cfg, ids, mask, target, chunk_size=128)
            return -jnp.sum(lp) / jnp.maximum(jnp.sum(target[:, 1:]), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm.trange(steps, desc="warm start (SFT)", disable=not progress, leave=False):
        idx = rng.choice(len(prompts), size=batch_size, replace=True, p=probs)
        ids, mask, target = pack_sft_batch([prompts[i] for i in idx], [responses[i] for i in idx],
                                           length, pad_id)
        params, opt_state, loss = step(params, opt_state, ids, mask, target)
        losses.append(float(loss))
    log.info("warm start: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    return params, losses
