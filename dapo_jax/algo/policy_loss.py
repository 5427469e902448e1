"""DAPO clipped policy-gradient loss (paper Eq. 8-10) and loss aggregation (Eq. 12).

Paper: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476.
Reference implementation: verl's ``compute_policy_loss_vanilla`` and ``agg_loss``
(``verl/trainer/ppo/core_algos.py``) as used by ``recipe/dapo``.

Everything here is a pure function of arrays. Hyperparameters (clip ranges, aggregation mode, ...) are
static Python scalars/strings; quantities that change every step (``global_token_count``,
``global_seq_count``, ``micro_batch_weight``) are traced arrays, so a new value never recompiles.

Public entry points validate their arguments in Python (clear errors at the boundary) and then call a
module-level ``jax.jit`` core; they can also be called inside an outer ``jax.jit`` / ``jax.grad``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

__all__ = [
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "compute_policy_loss",
    "per_token_policy_loss",
    "token_mean_metrics",
]

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "verl-legacy-token-mean",
)

# Token-level metrics returned by compute_policy_loss. For each NAME there is also NAME + "_sum" (the
# masked sum over this batch's response tokens); "token_count" is the number of response tokens.
_TOKEN_METRICS = (
    "pg_loss",
    "pg_clipfrac",
    "pg_clipfrac_upper",
    "pg_clipfrac_lower_bound",
    "pg_clipfrac_lower",
    "ppo_kl",
)


# --------------------------------------------------------------------------------------------------
# Validation (Python side, never traced)
# --------------------------------------------------------------------------------------------------


def _validate_clip(clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: float | None) -> None:
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(
            f"clip_ratio_low must be in [0, 1) (the ratio is clipped below at 1 - clip_ratio_low), "
            f"got {clip_ratio_low}. DAPO uses 0.2."
        )
    if clip_ratio_high < 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}. DAPO uses 0.28.")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(
            f"clip_ratio_c is the dual-clip bound for negative advantages and must be > 1.0, got "
            f"{clip_ratio_c}. verl's DAPO recipe uses 10.0; pass clip_ratio_c=None to disable dual-clip "
            f"(the paper's Eq. 10 exactly)."
        )


def _validate_agg(
    mode: str,
    *,
    loss_scale_length: float | None,
    num_dp_ranks: int,
    batch_size: int | None,
    micro_batch_weight: Any = None,
) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"Unknown loss_agg_mode {mode!r}; choose one of {LOSS_AGG_MODES}.")
    if loss_scale_length is not None and not loss_scale_length > 0:
        raise ValueError(
            f"loss_scale_length must be > 0 (e.g. the max response length), got {loss_scale_length}."
        )
    if not isinstance(num_dp_ranks, int) or num_dp_ranks < 1:
        raise ValueError(f"num_dp_ranks must be a positive int, got {num_dp_ranks!r}.")
    if mode != "verl-legacy-token-mean" and (micro_batch_weight is not None or num_dp_ranks != 1):
        raise ValueError(
            f"micro_batch_weight and num_dp_ranks only apply to loss_agg_mode='verl-legacy-token-mean' "
            f"(got mode {mode!r}). For exact {mode!r} across micro-batches/devices pass "
            f"global_token_count / global_seq_count instead."
        )
    if mode == "verl-legacy-token-mean" and batch_size is not None and batch_size % num_dp_ranks:
        raise ValueError(
            f"verl-legacy-token-mean splits the batch axis into num_dp_ranks={num_dp_ranks} equal rank "
            f"chunks, but the batch has {batch_size} rows; make the batch a multiple of num_dp_ranks."
        )


def _check_shapes(old_log_prob, log_prob, advantages, response_mask) -> None:
    shapes = {
        "old_log_prob": jnp.shape(old_log_prob),
        "log_prob": jnp.shape(log_prob),
        "response_mask": jnp.shape(response_mask),
    }
    if len(set(shapes.values())) != 1 or len(shapes["log_prob"]) != 2:
        raise ValueError(f"old_log_prob, log_prob and response_mask must all be [B, T]; got {shapes}.")
    b, t = shapes["log_prob"]
    adv_shape = jnp.shape(advantages)
    if adv_shape not in ((b,), (b, t)):
        raise ValueError(f"advantages must be [B]={[b]} or [B, T]={[b, t]}, got {list(adv_shape)}.")


# --------------------------------------------------------------------------------------------------
# Aggregation (Eq. 12 and the alternatives)
# --------------------------------------------------------------------------------------------------


def _f32(x):
    """Optional scalar -> float32 array, so int / float / array inputs share one compiled program."""
    return None if x is None else jnp.asarray(x, jnp.float32)


def _safe_den(x):
    """x where x > 0, else 1: an empty set contributes 0 instead of NaN."""
    return jnp.where(x > 0, x, jnp.ones_like(x))


def _aggregate(
    per_token_loss,
    mask,
    mode: str,
    global_token_count,
    global_seq_count,
    loss_scale_length: float | None,
    micro_batch_weight,
    num_dp_ranks: int,
):
    """Traced body of aggregate_loss (arguments already validated)."""
    # Sums and token counts in at least float32 (a bf16 count is exact only up to 256).
    per_token_loss = per_token_loss.astype(jnp.promote_types(per_token_loss.dtype, jnp.float32))
    maskf = mask.astype(per_token_loss.dtype)
    # where, not multiply: a masked position holding inf/NaN must not poison the sum.
    masked = jnp.where(mask > 0, per_token_loss, jnp.zeros_like(per_token_loss))

    if mode == "token-mean":
        den = jnp.sum(maskf) if global_token_count is None else jnp.asarray(global_token_count, maskf.dtype)
        return jnp.sum(masked) / _safe_den(den)

    if mode == "verl-legacy-token-mean":
        b, t = masked.shape
        r = num_dp_ranks
        chunk_sum = jnp.sum(masked.reshape(r, b // r, t), axis=(1, 2))
        chunk_cnt = jnp.sum(maskf.reshape(r, b // r, t), axis=(1, 2))
        chunk_mean = chunk_sum / _safe_den(chunk_cnt)
        weight = 1.0 if micro_batch_weight is None else jnp.asarray(micro_batch_weight, maskf.dtype)
        return weight * jnp.mean(chunk_mean)

    # Sequence-level modes. Fully masked rows (e.g. overlong-filtered samples) are excluded from
    # the default sequence count, as in current verl.
    tok_per_seq = jnp.sum(maskf, axis=-1)
    seq_sum = jnp.sum(masked, axis=-1)
    nonempty = (tok_per_seq > 0).astype(maskf.dtype)
    seq_den = jnp.sum(nonempty) if global_seq_count is None else jnp.asarray(global_seq_count, maskf.dtype)
    if mode == "seq-mean-token-mean":
        seq_loss = seq_sum / _safe_den(tok_per_seq)
        return jnp.sum(seq_loss * nonempty) / _safe_den(seq_den)
    if mode == "seq-mean-token-sum":
        return jnp.sum(seq_sum) / _safe_den(seq_den)
    if mode == "seq-mean-token-sum-norm":
        scale = float(masked.shape[-1]) if loss_scale_length is None else float(loss_scale_length)
        return jnp.sum(seq_sum) / _safe_den(seq_den) / scale
    raise AssertionError(mode)  # unreachable: validated


_aggregate_jit = jax.jit(_aggregate, static_argnames=("mode", "loss_scale_length", "num_dp_ranks"))


def aggregate_loss(
    per_token_loss: jax.Array,
    mask: jax.Array,
    mode: str = "token-mean",
    *,
    global_token_count: jax.Array | float | None = None,
    global_seq_count: jax.Array | float | None = None,
    loss_scale_length: float | None = None,
    micro_batch_weight: jax.Array | float | None = None,
    num_dp_ranks: int = 1,
) -> jax.Array:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    Modes (``mask`` is the response mask; masked positions never contribute, even if they hold inf/NaN):

    * ``"token-mean"`` (DAPO Eq. 12, the default): ``sum(loss * mask) / N`` where ``N`` is the number
      of response tokens in the whole *mini-batch*. Pass ``global_token_count=N`` whenever this call
      sees only part of the mini-batch (gradient-accumulation micro-batch, one data-parallel shard,
      one host): the per-call losses (and gradients) then *sum* to the exact mini-batch loss. With
      ``None`` the call's own token count is used (exact when the call sees the full mini-batch, e.g.
      a single ``jax.jit`` over a batch sharded across devices). Never average per-micro-batch means.
    * ``"seq-mean-token-mean"`` (original GRPO): per-sequence token mean, then mean over sequences.
      ``global_seq_count`` plays the role of ``global_token_count``.
    * ``"seq-mean-token-sum"``: per-sequence token sum, then mean over sequences.
    * ``"seq-mean-token-sum-norm"`` (Dr. GRPO): per-sequence token sum divided by the constant
      ``loss_scale_length`` (set it to the max response length; ``None`` uses ``T``, verl's default),
      then mean over sequences.
    * ``"verl-legacy-token-mean"``: what verl's FSDP actor computed in the published DAPO runs. The
      batch axis is split into ``num_dp_ranks`` equal contiguous chunks (one per data-parallel rank);
      each chunk is averaged over its *own* tokens, multiplied by ``micro_batch_weight`` (verl's
      ``micro_bsz / mini_bsz_per_rank``, i.e. ``1 / gradient_accumulation``; default 1), and the
      chunks are averaged (FSDP's gradient all-reduce-mean). Summed over the micro-batches of a
      mini-batch this is ``(1/R) sum_r sum_m (n_m / N_r) * token_mean(micro-batch m of rank r)``,
      which weights tokens of short micro-batches more than DAPO's Eq. 12. Offered only so users can
      reproduce verl's published curves.

    In every sequence mode, rows with no response tokens are excluded from the default sequence
    count and contribute 0 (never NaN). An all-empty batch gives a loss of 0.

    ``global_token_count`` is read only by ``token-mean`` and ``global_seq_count`` only by the
    ``seq-mean-*`` modes (a trainer may pass both); ``micro_batch_weight`` / ``num_dp_ranks`` are
    accepted only with ``verl-legacy-token-mean`` and raise otherwise, so they cannot silently do
    nothing. Counts and weights are cast to float32 (one compiled program for int/float/array).
    """
    per_token_loss = jnp.asarray(per_token_loss)
    mask = jnp.asarray(mask)
    if per_token_loss.shape != mask.shape or per_token_loss.ndim != 2:
        raise ValueError(
            f"per_token_loss and mask must both be [B, T], got {per_token_loss.shape} and {mask.shape}."
        )
    _validate_agg(mode, loss_scale_length=loss_scale_length, num_dp_ranks=num_dp_ranks,
                  batch_size=per_token_loss.shape[0], micro_batch_weight=micro_batch_weight)
    return _aggregate_jit(
        per_token_loss, mask, mode, _f32(global_token_count), _f32(global_seq_count),
        None if loss_scale_length is None else float(loss_scale_length), _f32(micro_batch_weight), num_dp_ranks,
    )


# --------------------------------------------------------------------------------------------------
# Per-token clipped objective (Eq. 8-10) + dual clip
# --------------------------------------------------------------------------------------------------


def _per_token(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high,
               clip_ratio_c, log_ratio_clamp):
    """Per-token loss and the per-token indicator arrays used by the metrics."""
    dtype = jnp.result_type(log_prob.dtype, jnp.float32)
    log_prob = log_prob.astype(dtype)
    old_log_prob = old_log_prob.astype(dtype)
    adv = advantages.astype(dtype)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.broadcast_to(adv, log_prob.shape)
    valid = response_mask > 0

    # Zero the log-ratio on padding *before* exp: a garbage log-prob there would give inf and then a
    # NaN gradient through the unselected branch of the later where (the "double where" rule).
    log_ratio = jnp.where(valid, log_prob - old_log_prob, jnp.zeros_like(log_prob))
    if log_ratio_clamp is not None:
        log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(log_ratio)  # r_{i,t}(theta), Eq. 9

    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)  # Eq. 10
    clip_pg_losses1 = jnp.maximum(pg_losses1, pg_losses2)  # = -min(r A, clip(r) A)
    clipped = pg_losses2 > pg_losses1  # the clipped branch is the active one (verl's definition)
    if clip_ratio_c is not None:
        pg_losses3 = -adv * clip_ratio_c
        dual = (clip_pg_losses1 > pg_losses3) & (adv < 0)
        per_tok = jnp.where(adv < 0, jnp.minimum(pg_losses3, clip_pg_losses1), clip_pg_losses1)
    else:
        dual = jnp.zeros_like(clipped)
        per_tok = clip_pg_losses1
    indicators = {
        "pg_loss": per_tok,
        "pg_clipfrac": clipped,
        "pg_clipfrac_upper": clipped & (adv > 0),
        "pg_clipfrac_lower_bound": clipped & (adv < 0),
        "pg_clipfrac_lower": dual,
        "ppo_kl": -log_ratio,
    }
    return per_tok, indicators


def per_token_policy_loss(
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    log_ratio_clamp: float | None = None,
) -> jax.Array:
    """The ``[B, T]`` per-token loss of :func:`compute_policy_loss` before aggregation.

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` (the negated summand of Eq. 10), and
    for ``A < 0`` additionally ``min(., -A c)`` (dual-clip, ``clip_ratio_c=c``). Values at masked
    positions are meaningless; aggregate with :func:`aggregate_loss`.
    """
    _validate_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c)
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    per_tok, _ = _per_token(jnp.asarray(old_log_prob), jnp.asarray(log_prob), jnp.asarray(advantages),
                            jnp.asarray(response_mask), float(clip_ratio_low), float(clip_ratio_high),
                            None if clip_ratio_c is None else float(clip_ratio_c),
                            None if log_ratio_clamp is None else float(log_ratio_clamp))
    return per_tok


@functools.partial(
    jax.jit,
    static_argnames=("clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_agg_mode",
                     "loss_scale_length", "log_ratio_clamp", "num_dp_ranks"),
)
def _policy_loss_jit(old_log_prob, log_prob, advantages, response_mask, global_token_count,
                     global_seq_count, micro_batch_weight, *, clip_ratio_low, clip_ratio_high,
                     clip_ratio_c, loss_agg_mode, loss_scale_length, log_ratio_clamp, num_dp_ranks):
    per_tok, ind = _per_token(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low,
                              clip_ratio_high, clip_ratio_c, log_ratio_clamp)
    loss = _aggregate(per_tok, response_mask, loss_agg_mode, global_token_count, global_seq_count,
                      loss_scale_length, micro_batch_weight, num_dp_ranks)

    valid = response_mask > 0
    dtype = per_tok.dtype
    token_count = jnp.sum(valid.astype(dtype))
    metrics: dict[str, jax.Array] = {"token_count": token_count,
                                     "seq_count": jnp.sum(jnp.any(valid, axis=-1).astype(dtype))}
    for name, x in ind.items():
        # Metrics are diagnostics: no gradient flows through them.
        x = jax.lax.stop_gradient(x.astype(dtype))
        s = jnp.sum(jnp.where(valid, x, jnp.zeros_like(x)))
        metrics[name + "_sum"] = s
        metrics[name] = s / _safe_den(token_count)
    return loss, metrics


def compute_policy_loss(
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    loss_agg_mode: str = "token-mean",
    global_token_count: jax.Array | float | None = None,
    global_seq_count: jax.Array | float | None = None,
    loss_scale_length: float | None = None,
    log_ratio_clamp: float | None = None,
    micro_batch_weight: jax.Array | float | None = None,
    num_dp_ranks: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DAPO's clipped policy-gradient loss (the negated objective of Eq. 8 / Eq. 10).

    Args:
      old_log_prob, log_prob, response_mask: ``[B, T]``. ``log_prob`` is the one to differentiate.
      advantages: ``[B]`` (one per response, broadcast over tokens) or ``[B, T]``; Eq. 9's
        ``A_hat_{i,t}``, e.g. from :func:`dapo_jax.algo.compute_grpo_advantages`.
      clip_ratio_low, clip_ratio_high: Clip-Higher's decoupled ``eps_low`` / ``eps_high`` (Eq. 10);
        the ratio ``r = exp(log_prob - old_log_prob)`` (Eq. 9) is clipped to ``[1-eps_low, 1+eps_high]``.
      clip_ratio_c: dual-clip bound (Ye et al. 2020; verl's DAPO recipe uses 10): for ``A < 0`` the
        per-token loss is capped at ``-A * c``. Must be > 1; ``None`` disables it, giving Eq. 10
        exactly (the paper has no dual clip).
      loss_agg_mode, global_token_count, global_seq_count, loss_scale_length, micro_batch_weight,
        num_dp_ranks: see :func:`aggregate_loss`. ``"token-mean"`` is Eq. 12.
      log_ratio_clamp: if set, clamp ``log_prob - old_log_prob`` to ``[-x, x]`` before ``exp`` (verl
        always clamps at 20). Off by default (paper).

    Returns:
      ``(loss, metrics)``. ``metrics`` holds jnp scalars, each a masked mean over this call's response
      tokens:

      * ``pg_loss``: per-token loss (same as ``loss`` only for an unsplit ``token-mean`` batch);
      * ``pg_clipfrac``: fraction of tokens whose clipped term is the active one
        (``pg_clipfrac_upper + pg_clipfrac_lower_bound``);
      * ``pg_clipfrac_upper``: ``A > 0`` and ``r > 1 + eps_high`` (Clip-Higher's bound is active);
      * ``pg_clipfrac_lower_bound``: ``A < 0`` and ``r < 1 - eps_low``;
      * ``pg_clipfrac_lower``: ``A < 0`` and the dual-clip bound is active (verl's name);
      * ``ppo_kl``: mean of ``old_log_prob - log_prob`` (after ``log_ratio_clamp``).

      For exact aggregation across micro-batches / devices / hosts, each ``NAME`` also has
      ``NAME_sum`` (the masked sum), plus ``token_count`` and ``seq_count`` (non-empty rows): sum
      them over the pieces and call :func:`token_mean_metrics`. Metrics carry no gradient.
    """
    _validate_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c)
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    _validate_agg(loss_agg_mode, loss_scale_length=loss_scale_length, num_dp_ranks=num_dp_ranks,
                  batch_size=jnp.shape(log_prob)[0], micro_batch_weight=micro_batch_weight)
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp}.")
    return _policy_loss_jit(
        jnp.asarray(old_log_prob), jnp.asarray(log_prob), jnp.asarray(advantages), jnp.asarray(response_mask),
        _f32(global_token_count), _f32(global_seq_count), _f32(micro_batch_weight),
        clip_ratio_low=float(clip_ratio_low),
        clip_ratio_high=float(clip_ratio_high),
        clip_ratio_c=None if clip_ratio_c is None else float(clip_ratio_c),
        loss_agg_mode=loss_agg_mode,
        loss_scale_length=None if loss_scale_length is None else float(loss_scale_length),
        log_ratio_clamp=None if log_ratio_clamp is None else float(log_ratio_clamp),
        num_dp_ranks=num_dp_ranks,
    )


def token_mean_metrics(summed: Mapping[str, Any]) -> dict[str, Any]:
    """Exact token means from metrics whose ``*_sum`` and ``token_count`` entries were summed.

    Example (gradient accumulation on one host)::

        parts = [compute_policy_loss(...)[1] for each micro-batch]
        summed = jax.tree.map(lambda *x: sum(x), *parts)
        token_mean_metrics(summed)  # {"pg_clipfrac": ..., ...} over the whole mini-batch

    Across hosts, ``psum`` / all-reduce the ``*_sum`` and ``token_count`` entries first.
    """
    count = summed["token_count"]
    den = jnp.where(count > 0, count, 1)
    return {name: summed[name + "_sum"] / den for name in _TOKEN_METRICS if name + "_sum" in summed}
