"""All DAPO shaping of one generation batch, as one pure function: rewards in, training signal out.

Order (paper Sec. 3): the soft overlong punishment is added to the rule reward (Eq. 13); the
dynamic-sampling filter reads the accuracy or the shaped score (Eq. 11); group advantages use the
shaped score (Eq. 9); overlong filtering takes truncated samples out of the loss (Sec. 3.4). Groups
are never split, so shaping each generation batch on its own equals shaping the training batch that
dynamic sampling later assembles from kept groups.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dapo_jax.algo.advantages import compute_grpo_advantages
from dapo_jax.algo.overlong import overlong_penalty


@dataclasses.dataclass(frozen=True)
class ShapingSettings:
    """The static knobs of DAPO's reward shaping (from config.algo / config.rollout)."""

    group_size: int
    max_response_length: int  # L_max of Eq. 13
    max_new_tokens: int  # the sampler's limit: a response this long without EOS was truncated
    overlong_buffer_len: int = 0  # L_cache; 0 disables the soft punishment
    overlong_penalty_factor: float = 1.0
    overlong_filter: bool = True
    dynamic_sampling: bool = True
    filter_metric: str = "acc"  # "acc" | "score"
    adv_eps: float = 1e-6
    norm_adv_by_std: bool = True


@dataclasses.dataclass(frozen=True)
class ShapedBatch:
    """Per-sample training signal of one generation batch ([N] arrays; filter_metric is [P, G])."""

    score: np.ndarray  # rule reward + overlong penalty
    advantages: np.ndarray
    truncated: np.ndarray  # bool: cut at max_new_tokens without EOS
    in_loss: np.ndarray  # bool: the sample's tokens enter the loss (False: overlong-filtered)
    filter_metric: np.ndarray  # what dynamic sampling compares within each group


def shape_rewards(reward: np.ndarray, acc: np.ndarray, lengths: np.ndarray, eos: np.ndarray,
                  s: ShapingSettings) -> ShapedBatch:
    """Shapes `reward`/`acc` of N = P * G samples (group p's samples contiguous) of token `lengths`.

    `lengths` count response tokens (the EOS included), never characters (Eq. 13 is in tokens).
    """
    reward = np.asarray(reward, np.float32)
    lengths = np.asarray(lengths)
    eos = np.asarray(eos).astype(bool)
    n, g = reward.shape[0], s.group_size
    if n % g or not (np.shape(acc) == lengths.shape == eos.shape == (n,)):
        raise ValueError(f"reward, acc, lengths and eos must be [N] with N a multiple of the group "
                         f"size {g}; got {reward.shape}, {np.shape(acc)}, {lengths.shape}, {eos.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be integer token counts, got dtype {lengths.dtype}")
    score = reward
    if s.overlong_buffer_len:
        score = score + np.asarray(overlong_penalty(
            lengths, max_response_length=s.max_response_length,
            overlong_buffer_len=s.overlong_buffer_len, penalty_factor=s.overlong_penalty_factor))
    advantages = np.asarray(compute_grpo_advantages(score.reshape(-1, g), eps=s.adv_eps,
                                                    norm_by_std=s.norm_adv_by_std)).reshape(n)
    truncated = ~eos & (lengths >= s.max_new_tokens)
    in_loss = ~truncated if s.overlong_filter else np.ones(n, bool)
    if not s.dynamic_sampling:
        # Distinct values in every group: the accumulator keeps every group.
        metric = np.tile(np.arange(g, dtype=np.float32), (n // g, 1))
    elif s.filter_metric == "acc":
        metric = np.asarray(acc, np.float32).reshape(-1, g)
    elif s.filter_metric == "score":
        metric = score.reshape(-1, g)
    else:
        raise ValueError(f"filter_metric must be 'acc' or 'score', got {s.filter_metric!r}")
    return ShapedBatch(score=score.astype(np.float32), advantages=advantages.astype(np.float32),
                       truncated=truncated, in_loss=in_loss, filter_metric=metric)
