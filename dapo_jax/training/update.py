"""Jitted policy-update computations with explicit shardings: old log-probs and one DAPO update.

Both take one mini-batch laid out as [num_micro, micro_batch, ...] and scan over its micro-batches,
so the old log-probs stay on device in exactly the layout the update reads. Each micro-batch's loss
is its token-sum divided by the *mini-batch's* token count (DAPO Eq. 12), so the summed gradient is
exactly the mini-batch's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dapo_jax import algo
from dapo_jax.models.config import ModelConfig
from dapo_jax.models.logprobs import sequence_logprobs
from dapo_jax.models.qwen2 import Params


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static knobs of the DAPO objective (from config.algo)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = 10.0
    loss_agg_mode: str = "token-mean"
    loss_scale_length: float | None = None
    log_ratio_clamp: float | None = None
    num_dp_ranks: int = 1  # only for verl-legacy-token-mean
    chunk_size: int = 1024
    # The policy is softmax(logits / temperature) with the rollout temperature (as verl's actor), so
    # old and new log-probs describe the distribution the samples were drawn from.
    temperature: float = 1.0


def lr_schedule(lr: float, warmup_steps: int, *, decay: str = "constant", total_steps: int = 0,
                min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup over `warmup_steps` training steps, then `decay` (optim.lr_schedule).

    Step s (from 0) trains at lr * min(1, (s + 1) / warmup_steps): the first step already learns.
    "constant" (the paper) stays at lr; "cosine" and "linear" decay from lr at the last warmup step
    (s = warmup_steps - 1) to lr * min_lr_ratio at the last step (s = total_steps - 1).
    """
    if decay not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr schedule must be constant, cosine or linear, got {decay!r}")
    peak = max(warmup_steps - 1, 0)
    warmup = (optax.constant_schedule(lr) if warmup_steps <= 1 else
              optax.linear_schedule(lr / warmup_steps, lr, transition_steps=warmup_steps - 1))
    if decay == "constant":
        return warmup
    decay_steps = max(total_steps - 1 - peak, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    else:
        after = optax.linear_schedule(lr, lr * min_lr_ratio, transition_steps=decay_steps)
    if peak == 0:
        return after
    return optax.join_schedules([warmup, after], boundaries=[peak])


def make_optimizer(*, weight_decay: float, grad_clip: float, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, as torch) after global-norm clipping; lr injected per step."""
    def build(learning_rate):
        parts = []
        if grad_clip and grad_clip > 0:
            parts.append(optax.clip_by_global_norm(grad_clip))
        parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
        return optax.chain(*parts)
    return optax.inject_hyperparams(build)(learning_rate=0.0)


def batch_spec(ndim: int, leading: int = 0) -> PartitionSpec:
    """PartitionSpec of a batch array: `leading` unsharded axes, then batch over (data, fsdp)."""
    return PartitionSpec(*([None] * leading), ("data", "fsdp"), *([None] * (ndim - leading - 1)))


def build_minibatch_logprob_fn(cfg: ModelConfig, mesh: Mesh, param_shardings: Any, prompt_len: int,
                               loss: LossSettings, rules: Mapping[str, Any] | None = None):
    """jit(params, input_ids, attention_mask, response_mask, rollout_logprobs) -> (old, diff).

    Inputs are one mini-batch [num_micro, micro_batch, ...] (response fields [..., R]); `old` are
    the policy's log-probs of the response tokens at the rollout temperature in the same layout,
    ready for the update. `diff` = (sum, count, max) of |p_rollout - p_old| over response tokens:
    verl's sampler/trainer mismatch check.
    """
    sh = NamedSharding(mesh, batch_spec(3, leading=1))
    rep = NamedSharding(mesh, PartitionSpec())

    def one(params, ids, mask, resp):
        targets = jnp.concatenate([jnp.zeros_like(mask[:, :prompt_len]), resp], axis=1)
        lp, _ = sequence_logprobs(params, cfg, ids, mask, targets, chunk_size=loss.chunk_size,
                                  mesh=mesh, rules=rules, temperature=loss.temperature)
        return lp[:, prompt_len:]

    def fn(params, input_ids, attention_mask, response_mask, rollout_logprobs):
        old = jax.lax.map(lambda m: one(params, *m), (input_ids, attention_mask, response_mask))
        valid = response_mask > 0
        diff = jnp.where(valid, jnp.abs(jnp.exp(rollout_logprobs) - jnp.exp(old)), 0.0)
        stats = jnp.stack([jnp.sum(diff), jnp.sum(valid).astype(jnp.float32), jnp.max(diff)])
        return old, stats

    return jax.jit(fn, in_shardings=(param_shardings, sh, sh, sh, sh), out_shardings=(sh, rep))


def _apply_gradients(tx: optax.GradientTransformation, params: Params, opt_state: Any, grads: Any,
                     lr: jax.Array) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One AdamW step from summed gradients, skipped (state kept) when they are not finite."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    # This step's learning rate goes into a copy: a skipped update keeps the state as it was.
    stepped = opt_state._replace(hyperparams={**opt_state.hyperparams,
                                              "learning_rate": jnp.asarray(lr, jnp.float32)})
    updates, new_opt = tx.update(grads, stepped, params)
    new_params = optax.apply_updates(params, updates)
    # Skip the update (keep params and the whole optimizer state) when the gradient is not finite.
    # Not optax.apply_if_finite: after max_consecutive_errors it applies the non-finite update
    # anyway, and it reports skips only through its state; this never applies one and reports
    # every skipped update as a metric.
    new_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
    new_opt = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)
    return new_params, new_opt, {"grad_norm": grad_norm,
                                 "update_skipped": (~finite).astype(jnp.float32)}


def build_update_fn(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    param_shardings: Any, opt_shardings: Any, prompt_len: int,
                    loss: LossSettings, rules: Mapping[str, Any] | None = None):
    """jit(params, opt_state, minibatch, lr) -> (params, opt_state, metrics): one optimizer update.

    `minibatch` fields are [num_micro, micro_batch, ...]: input_ids, attention_mask (full rows),
    response_mask, old_logprobs ([..., R]) and advantages ([M, mb]); plus scalars token_count and
    seq_count of the whole mini-batch. Non-finite gradients skip the update (reported in metrics).
    """
    rep = NamedSharding(mesh, PartitionSpec())
    mb_sh = {k: NamedSharding(mesh, batch_spec(n, leading=1)) for k, n in
             (("input_ids", 3), ("attention_mask", 3), ("response_mask", 3), ("old_logprobs", 3),
              ("advantages", 2))}
    mb_sh.update(token_count=rep, seq_count=rep)

    def micro_loss(params, micro, token_count, seq_count, weight):
        targets = jnp.concatenate(
            [jnp.zeros_like(micro["attention_mask"][:, :prompt_len]), micro["response_mask"]], axis=1)
        lp, ent = sequence_logprobs(params, cfg, micro["input_ids"], micro["attention_mask"], targets,
                                    return_entropy=True, chunk_size=loss.chunk_size, mesh=mesh,
                                    rules=rules, temperature=loss.temperature)
        lp, ent = lp[:, prompt_len:], ent[:, prompt_len:]
        legacy = loss.loss_agg_mode == "verl-legacy-token-mean"
        value, metrics = algo.compute_policy_loss(
            micro["old_logprobs"], lp, micro["advantages"], micro["response_mask"],
            clip_ratio_low=loss.clip_ratio_low, clip_ratio_high=loss.clip_ratio_high,
            clip_ratio_c=loss.clip_ratio_c, loss_agg_mode=loss.loss_agg_mode,
            global_token_count=None if legacy else token_count,
            global_seq_count=None if legacy else seq_count,
            loss_scale_length=loss.loss_scale_length, log_ratio_clamp=loss.log_ratio_clamp,
            micro_batch_weight=weight if legacy else None,
            num_dp_ranks=loss.num_dp_ranks if legacy else 1)
        mask = micro["response_mask"] > 0
        metrics["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(mask, ent, 0.0)))
        return value, metrics

    def fn(params, opt_state, mb, lr):
        num_micro = mb["input_ids"].shape[0]
        weight = jnp.float32(1.0 / num_micro)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(acc, micro):
            (value, metrics), grads = grad_fn(params, micro, mb["token_count"], mb["seq_count"],
                                              weight)
            grads_acc, loss_acc, met_acc = acc
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            met_acc = {k: met_acc[k] + metrics[k] for k in met_acc}
            return (grads_acc, loss_acc + value, met_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        names = ["pg_loss_sum", "pg_clipfrac_sum", "pg_clipfrac_upper_sum",
                 "pg_clipfrac_lower_bound_sum", "pg_clipfrac_lower_sum", "ppo_kl_sum",
                 "entropy_sum", "token_count"]
        init = (zeros, jnp.float32(0.0), {k: jnp.float32(0.0) for k in names})
        micro_batches = {k: mb[k] for k in ("input_ids", "attention_mask", "response_mask",
                                            "old_logprobs", "advantages")}
        (grads, loss_value, sums), _ = jax.lax.scan(body, init, micro_batches)
        new_params, new_opt, applied = _apply_gradients(tx, params, opt_state, grads, lr)
        count = jnp.maximum(sums["token_count"], 1.0)
        metrics = {k[:-4]: v / count for k, v in sums.items() if k.endswith("_sum")}
        metrics.update(loss=loss_value, response_tokens=sums["token_count"], **applied)
        return new_params, new_opt, metrics

    return jax.jit(fn, donate_argnums=(0, 1),
                   in_shardings=(param_shardings, opt_shardings, mb_sh, rep),
                   out_shardings=(param_shardings, opt_shardings, rep))


# --------------------------------------------------------------------------------------------------
# Packed rows (trainer.packing): one program per row-length bucket, micro-batches looped on the host
# --------------------------------------------------------------------------------------------------

# Fields of one packed micro-batch [rows, L] (see `batching.pack_minibatch`).
PACKED_FIELDS = ("input_ids", "segment_ids", "positions", "response_mask", "old_logprobs",
                 "advantages")
METRIC_SUMS = ("pg_loss_sum", "pg_clipfrac_sum", "pg_clipfrac_upper_sum",
               "pg_clipfrac_lower_bound_sum", "pg_clipfrac_lower_sum", "ppo_kl_sum", "entropy_sum",
               "token_count", "loss")


def _packed_forward(params, cfg, micro, loss: LossSettings, mesh, rules, return_entropy: bool):
    seg = micro["segment_ids"]
    return sequence_logprobs(params, cfg, micro["input_ids"], (seg > 0).astype(jnp.int32),
                             micro["response_mask"], return_entropy=return_entropy,
                             chunk_size=loss.chunk_size, mesh=mesh, rules=rules,
                             temperature=loss.temperature, positions=micro["positions"],
                             segment_ids=seg)


def build_packed_logprob_fn(cfg: ModelConfig, mesh: Mesh, param_shardings: Any, loss: LossSettings,
                            rules: Mapping[str, Any] | None = None):
    """jit(params, micro) -> (old [rows, L], diff): old log-probs of one packed micro-batch.

    `micro` holds input_ids, segment_ids, positions, response_mask and rollout_logprobs [rows, L];
    `diff` = (sum, count, max) of |p_rollout - p_old| over its response tokens.
    """
    sh = NamedSharding(mesh, batch_spec(2))
    rep = NamedSharding(mesh, PartitionSpec())

    def fn(params, micro):
        old, _ = _packed_forward(params, cfg, micro, loss, mesh, rules, return_entropy=False)
        valid = micro["response_mask"] > 0
        diff = jnp.where(valid, jnp.abs(jnp.exp(micro["rollout_logprobs"]) - jnp.exp(old)), 0.0)
        return old, jnp.stack([jnp.sum(diff), jnp.sum(valid).astype(jnp.float32), jnp.max(diff)])

    fields = ("input_ids", "segment_ids", "positions", "response_mask", "rollout_logprobs")
    return jax.jit(fn, in_shardings=(param_shardings, {k: sh for k in fields}),
                   out_shardings=(sh, rep))


def build_packed_grad_fn(cfg: ModelConfig, mesh: Mesh, param_shardings: Any, loss: LossSettings,
                         response_length: int, rules: Mapping[str, Any] | None = None):
    """jit(params, grads, sums, micro, token_count, seq_count) -> (grads, sums).

    Adds one packed micro-batch's gradient to `grads` (float32, the params' shardings) and its
    metric sums (METRIC_SUMS) to `sums`. The loss divides by the *mini-batch's* token_count
    (or seq_count), so the sum over micro-batches is exactly the mini-batch's gradient, however
    the samples were packed. verl-legacy-token-mean is defined by fixed-size micro-batches and
    has no packed form: the trainer keeps the padded layout for it.
    """
    from dapo_jax.training.packing import packed_policy_loss  # packing imports this module's deps

    if loss.loss_agg_mode == "verl-legacy-token-mean":
        raise ValueError("verl-legacy-token-mean averages fixed-size micro-batches; use the padded "
                         "layout (trainer.packing=False) for it")
    sh = NamedSharding(mesh, batch_spec(2))
    rep = NamedSharding(mesh, PartitionSpec())
    scale_length = loss.loss_scale_length or float(response_length)

    def micro_loss(params, micro, token_count, seq_count):
        lp, ent = _packed_forward(params, cfg, micro, loss, mesh, rules, return_entropy=True)
        seg = micro["segment_ids"]
        rows, width = seg.shape
        # A sample never leaves its row, so (row, segment) names it inside the micro-batch.
        sample = jnp.where(seg > 0, jnp.arange(rows)[:, None] * width + seg - 1, -1)
        value, metrics = packed_policy_loss(
            micro["old_logprobs"], lp, micro["advantages"], micro["response_mask"], sample,
            num_samples=rows * width, clip_ratio_low=loss.clip_ratio_low,
            clip_ratio_high=loss.clip_ratio_high, clip_ratio_c=loss.clip_ratio_c,
            loss_agg_mode=loss.loss_agg_mode, global_token_count=token_count,
            global_seq_count=seq_count, loss_scale_length=scale_length,
            log_ratio_clamp=loss.log_ratio_clamp)
        mask = micro["response_mask"] > 0
        metrics["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(mask, ent, 0.0)))
        return value, metrics

    def fn(params, grads, sums, micro, token_count, seq_count):
        (value, metrics), g = jax.value_and_grad(micro_loss, has_aux=True)(
            params, micro, token_count, seq_count)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        metrics["loss"] = value
        return grads, {k: sums[k] + metrics[k] for k in METRIC_SUMS}

    return jax.jit(fn, donate_argnums=(1, 2),
                   in_shardings=(param_shardings, param_shardings, rep, {k: sh for k in PACKED_FIELDS},
                                 rep, rep),
                   out_shardings=(param_shardings, rep))


def build_zero_fn(mesh: Mesh, param_shardings: Any):
    """jit(params) -> (grads, sums): a zero float32 gradient sum in the params' shardings and
    zeroed METRIC_SUMS, the start of one mini-batch's accumulation."""
    rep = NamedSharding(mesh, PartitionSpec())

    def fn(params):
        return (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params),
                {k: jnp.float32(0.0) for k in METRIC_SUMS})

    return jax.jit(fn, in_shardings=(param_shardings,), out_shardings=(param_shardings, rep))


def build_apply_fn(tx: optax.GradientTransformation, mesh: Mesh, param_shardings: Any,
                   opt_shardings: Any):
    """jit(params, opt_state, grads, lr) -> (params, opt_state, {grad_norm, update_skipped})."""
    rep = NamedSharding(mesh, PartitionSpec())

    def fn(params, opt_state, grads, lr):
        return _apply_gradients(tx, params, opt_state, grads, lr)

    return jax.jit(fn, donate_argnums=(0, 1),
                   in_shardings=(param_shardings, opt_shardings, param_shardings, rep),
                   out_shardings=(param_shardings, opt_shardings, rep))


def init_opt_state(tx: optax.GradientTransformation, params: Params) -> tuple[Any, Any]:
    """Optimizer state created next to the params (moments in the params' shardings, scalars replicated)."""
    # Explicit: jit places outputs that don't depend on input data (all of tx.init) on device 0 only.
    replicated = NamedSharding(jax.tree.leaves(params)[0].sharding.mesh, PartitionSpec())
    shardings = optax.tree_map_params(tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params),
                                      params, transform_non_params=lambda _: replicated)
    return jax.jit(tx.init, out_shardings=shardings)(params), shardings
