"""Group-relative advantages (DAPO paper Eq. 9; GRPO; Dr. GRPO).

``A_hat_{i,t} = (R_i - mean({R_j}_{j=1..G})) / std({R_j}_{j=1..G})`` for every token t of response i,
where ``R_i`` is response i's scalar score (already including the overlong penalty of Eq. 13) and the
group is the G responses sampled for one prompt.

Conventions follow verl's ``compute_grpo_outcome_advantage``: unbiased std (``ddof=1``, torch's
default), ``eps`` added to the std, and a group of one response gets mean 0 and std 1 (so its
advantage is ``R / (1 + eps)``). ``norm_by_std=False`` is Dr. GRPO (``R - mean``, no division).
A constant group of two or more responses gets exactly zero advantage (verl would return the
rounding error of the mean divided by ``std + eps``, which need not be tiny).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["compute_grpo_advantages"]


def _as_float(scores):
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    return scores


@functools.partial(jax.jit, static_argnames=("eps", "norm_by_std"))
def _grouped_2d(scores, *, eps: float, norm_by_std: bool):
    """[P, G] scores -> [P, G] advantages."""
    g = scores.shape[1]
    if g == 1:  # verl: mean 0, std 1 for a singleton group
        mean = jnp.zeros_like(scores)
        std = jnp.ones_like(scores)
    else:
        mean = jnp.mean(scores, axis=1, keepdims=True)
        std = jnp.std(scores, axis=1, keepdims=True, ddof=1)
    centered = scores - mean
    adv = centered / (std + eps) if norm_by_std else centered
    if g > 1:
        # A constant group has zero advantage exactly (float rounding in the mean would otherwise be
        # amplified by 1 / (std + eps) with std ~ 0).
        constant = jnp.max(scores, axis=1, keepdims=True) == jnp.min(scores, axis=1, keepdims=True)
        adv = jnp.where(constant, jnp.zeros_like(adv), adv)
    return adv


@functools.partial(jax.jit, static_argnames=("num_groups", "eps", "norm_by_std"))
def _grouped_segments(scores, group_ids, *, num_groups: int, eps: float, norm_by_std: bool):
    """[N] scores with [N] int ids in [0, num_groups) -> [N] advantages (segment_sum based)."""
    seg = functools.partial(jax.ops.segment_sum, segment_ids=group_ids, num_segments=num_groups)
    count = seg(jnp.ones_like(scores))
    mean_g = seg(scores) / jnp.where(count > 0, count, 1.0)
    centered_for_var = scores - mean_g[group_ids]
    var_g = seg(centered_for_var * centered_for_var) / jnp.where(count > 1, count - 1.0, 1.0)
    single = count[group_ids] <= 1
    mean = jnp.where(single, 0.0, mean_g[group_ids])
    std = jnp.where(single, 1.0, jnp.sqrt(var_g)[group_ids])
    centered = scores - mean
    adv = centered / (std + eps) if norm_by_std else centered
    seg_max = jax.ops.segment_max(scores, group_ids, num_segments=num_groups)
    seg_min = jax.ops.segment_min(scores, group_ids, num_segments=num_groups)
    constant = (seg_max == seg_min)[group_ids] & ~single  # exact zero for constant groups (see above)
    return jnp.where(constant, jnp.zeros_like(adv), adv)


def compute_grpo_advantages(
    scores,
    group_index=None,
    *,
    group_size: int | None = None,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    num_groups: int | None = None,
) -> jax.Array:
    """Per-response group-normalised advantages (Eq. 9). Broadcast over tokens by the policy loss.

    Accepted layouts (output has the shape of ``scores``):

    * ``scores [P, G]``: one row per prompt group.
    * ``scores [N]`` with ``group_size=G``: ``N = P * G`` with each group's G samples contiguous.
    * ``scores [N]`` with ``group_index [N]``: arbitrary integer group ids, groups need not be
      contiguous nor of equal size. When ``group_index`` is concrete (numpy / a concrete jax array)
      its ids are renumbered on the host with ``np.unique``, so any ints work. Under an outer
      ``jax.jit`` (traced ids) the ids must already lie in ``[0, num_groups)``; ``num_groups``
      defaults to ``N`` so the compiled program depends only on the input shape.

    Args:
      eps: added to the std (verl: 1e-6).
      norm_by_std: ``False`` gives Dr. GRPO's unnormalised ``R - mean``.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    scores = _as_float(scores)
    eps = float(eps)
    norm_by_std = bool(norm_by_std)

    if scores.ndim == 2:
        if group_index is not None or group_size not in (None, scores.shape[1]):
            raise ValueError(
                f"scores is [P, G]={list(scores.shape)}: groups are its rows, so pass neither group_index "
                f"nor a different group_size (got group_size={group_size})."
            )
        return _grouped_2d(scores, eps=eps, norm_by_std=norm_by_std)

    if scores.ndim != 1:
        raise ValueError(f"scores must be [P, G] or [N], got shape {list(scores.shape)}.")
    n = scores.shape[0]

    if group_index is None:
        if group_size is None:
            raise ValueError("Flat scores [N] need group_index [N] or group_size (contiguous groups of G).")
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size={group_size} must be >= 1 and divide len(scores)={n}.")
        return _grouped_2d(scores.reshape(n // group_size, group_size), eps=eps,
                           norm_by_std=norm_by_std).reshape(n)

    if group_size is not None:
        raise ValueError("Pass either group_index or group_size, not both.")
    if jnp.shape(group_index) != (n,):
        raise ValueError(f"group_index must be [N]={[n]}, got {list(jnp.shape(group_index))}.")
    if isinstance(group_index, jax.core.Tracer):
        ids = group_index
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"group_index must hold integer ids, got dtype {ids.dtype}.")
        k = n if num_groups is None else int(num_groups)
    else:
        host_ids = np.asarray(group_index)
        if not np.issubdtype(host_ids.dtype, np.integer):
            raise ValueError(
                f"group_index must hold integer ids, got dtype {host_ids.dtype}; map string uids to ints "
                f"first (e.g. np.unique(uids, return_inverse=True)[1])."
            )
        ids = jnp.asarray(np.unique(host_ids, return_inverse=True)[1].reshape(n).astype(np.int32))
        k = n  # max possible number of groups: one compile per input shape, whatever the data
        if num_groups is not None and len(np.unique(host_ids)) > num_groups:
            raise ValueError(f"group_index has {len(np.unique(host_ids))} distinct ids > num_groups={num_groups}.")
    return _grouped_segments(scores, ids, num_groups=k, eps=eps, norm_by_std=norm_by_std)
