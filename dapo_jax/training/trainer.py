"""The DAPO training loop (the paper's Algorithm 1) as one-way stages with the parts passed in.

One step: sample prompts -> rollout (n samples each) -> reward -> DAPO shaping (overlong penalty,
filter metric, advantages, overlong filter) -> dynamic sampling until `train_batch_size` groups vary
in outcome -> old log-probs -> one AdamW update per mini-batch (exact global token-mean) -> new
weights to the sampler -> metrics -> checkpoint. Steps count optimizer updates' steps, never
generation batches. The rollout backend and the reward function are injectable; the defaults are
the engine-backed `RolloutDriver` and the configured rule-based scorer.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import time
import uuid
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath
from jax.sharding import NamedSharding

import data_pipeline as dp
from data_pipeline import datasets
from dapo_jax import algo, experiment, models
from dapo_jax.config_validation import as_list, validate_config
from dapo_jax.eval.runner import evaluate_records
from dapo_jax.rewards.batch import score_batch
from dapo_jax.rewards.custom import RewardFn, load_reward_fn
from dapo_jax.runtime.cli_errors import UserError
from dapo_jax.runtime.host_transfer import tree_to_host
from dapo_jax.sampler import RolloutBackend, RolloutDriver, RolloutRequest
from dapo_jax.training import batching, reporting, run_record
from dapo_jax.training.checkpointing import CheckpointStore
from dapo_jax.runtime.devices import peak_flops_per_device
from dapo_jax.training.metrics_writer import MetricsWriter
from dapo_jax.training.policy_init import initial_params
from dapo_jax.training.preemption import PREEMPTED_EXIT_CODE, Preempted, StopFlag
from dapo_jax.training.update import (batch_spec, build_apply_fn, build_minibatch_logprob_fn,
                                      build_packed_grad_fn, build_packed_logprob_fn,
                                      build_update_fn, build_zero_fn, init_opt_state)

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "RewardFn", "Trainer"]

log = logging.getLogger(__name__)


def configured_reward(config: ml_collections.ConfigDict) -> RewardFn:
    """`reward.fn` when set (imported and checked now), else the config's rule-based scorer."""
    r = config.reward
    if r.get("fn"):
        return load_reward_fn(r.fn)

    def reward(texts: list[str], truths: list[str]) -> list[dict]:
        return score_batch(texts, truths, scorer=r.scorer, num_workers=r.num_workers or None,
                           boxed_fallback=bool(r.get("boxed_fallback", False)))

    return reward


# Config fields a resumed run must keep: the data position and the dynamic-sampling state count in
# generation batches of prompts and in groups of rollout.n samples.
RESUME_FIXED_FIELDS = ("trainer.train_batch_size", "trainer.gen_batch_size", "rollout.n")


def _field(config: ml_collections.ConfigDict, key: str) -> Any:
    section, name = key.split(".")
    return config[section][name]


def prepare_workdir(workdir: str | os.PathLike) -> epath.Path:
    """The run's workdir as an absolute path, created if needed and checked to be writable.

    Raises a UserError naming --workdir when it is a file or cannot be written (gs:// paths are only
    created: object stores have no permissions to probe cheaply).
    """
    text = os.fspath(workdir)
    if "://" in text:  # Orbax needs absolute paths; gs:// paths are already absolute
        path = epath.Path(text)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = epath.Path(os.path.abspath(text))
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir {text} is a file, not a folder: pass a folder (a new one, or the "
                        "workdir of the run to resume)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_check_{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--workdir {text} cannot be written ({e.strerror or e}): pass a folder you "
                        "can create and write to") from e
    return path


@dataclasses.dataclass
class GenerationBatch:
    """One generation batch after rollout, reward and shaping (per-sample arrays, group order)."""

    arrays: dict[str, np.ndarray]
    filter_metric: np.ndarray  # [P, G]
    acc: np.ndarray  # [N] accuracy before any filtering
    truncated_prompts: int
    rollout_stats: dict[str, float]


class _Timer(collections.defaultdict):
    """Seconds per phase: `with timer("gen"): ...` adds up."""

    def __init__(self, *names: str):
        super().__init__(float, {n: 0.0 for n in names})

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self[name] += time.perf_counter() - t0


class Trainer:
    """Owns the policy, optimizer state, data position, dynamic-sampling state and checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                 progress: bool | None = None, rollout: RolloutBackend | None = None,
                 reward_fn: RewardFn | None = None):
        """`rollout` replaces the engine-backed driver; `reward_fn` the configured scorer. The soft
        overlong punishment is part of DAPO's shaping and applies to any reward."""
        c = self.config = config
        # Bad input fails here, before any data or model work: the config, the workdir, reward.fn,
        # then every dataset.
        validate_config(c, jax.device_count())
        self.workdir = prepare_workdir(workdir)
        self.reward_fn = reward_fn if reward_fn is not None else configured_reward(c)
        self.is_main = jax.process_index() == 0
        self.progress = sys.stderr.isatty() if progress is None else progress
        # Every dataset is read through its TFDS array_record cache (built once, by process 0).
        data_cache = datasets.cache_dir(c, self.workdir)
        shared = datasets.cache_is_shared(c, self.workdir)
        self.train_records = datasets.load_records(c.data.train, c, split="train",
                                                   cache_dir=data_cache, shared=shared)
        self.val_sets = {datasets.dataset_name(v): datasets.load_records(
            v, c, split="val", cache_dir=data_cache, shared=shared) for v in as_list(c.data.val)}
        self.exp = exp = experiment.build(c, workdir=self.workdir, train_records=self.train_records,
                                          validated=True)  # validated above, before the data
        self.mesh, self.model_cfg, self.tokenizer = exp.mesh, exp.model_config, exp.tokenizer
        if self.is_main:  # <workdir>/run/: config, its diff, commit, versions, sources, tokenizer
            run_record.write_run_record(c, self.workdir, tokenizer_dir=exp.tokenizer_dir)
        self.P, self.R, self.G = exp.prompt_length, exp.response_length, int(c.rollout.n)
        self.shaping = algo.ShapingSettings(
            group_size=self.G, max_response_length=self.R,
            max_new_tokens=int(c.rollout.max_new_tokens),
            overlong_buffer_len=int(c.algo.overlong_buffer.len) if c.algo.overlong_buffer.enable
            else 0, overlong_penalty_factor=float(c.algo.overlong_buffer.penalty_factor),
            overlong_filter=bool(c.algo.overlong_filter),
            dynamic_sampling=bool(c.algo.dynamic_sampling.enable),
            filter_metric=c.algo.dynamic_sampling.metric, adv_eps=float(c.algo.adv_eps),
            norm_adv_by_std=bool(c.algo.norm_adv_by_std))

        self.params = initial_params(exp, workdir=self.workdir, train_records=self.train_records,
                                     progress=self.progress)
        self.param_shardings = models.param_shardings(self.model_cfg, self.mesh)
        self.tx, self.lr = exp.optimizer()
        self.opt_state, self.opt_shardings = init_opt_state(self.tx, self.params)
        self.packing = experiment.uses_packing(c)
        if self.packing:  # token-budget micro-batches of packed rows
            self.layout = experiment.packing_layout(c, self.mesh)
            self.packed_logprob_fn = build_packed_logprob_fn(self.model_cfg, self.mesh,
                                                             self.param_shardings, exp.loss)
            self.grad_fn = build_packed_grad_fn(self.model_cfg, self.mesh, self.param_shardings,
                                                exp.loss, self.R)
            self.zero_fn = build_zero_fn(self.mesh, self.param_shardings)
            self.apply_fn = build_apply_fn(self.tx, self.mesh, self.param_shardings,
                                           self.opt_shardings)
        else:  # padded rows, micro-batches of trainer.micro_batch_size samples
            self.logprob_fn = build_minibatch_logprob_fn(self.model_cfg, self.mesh,
                                                         self.param_shardings, self.P, exp.loss)
            self.update_fn = build_update_fn(self.model_cfg, self.tx, self.mesh,
                                             self.param_shardings, self.opt_shardings, self.P,
                                             exp.loss)

        self.driver = rollout if rollout is not None else RolloutDriver(
            exp.engine(), self.params, steps_per_sync=c.rollout.steps_per_sync,
            tokenizer=self.tokenizer, progress=self.progress)

        ds = c.algo.dynamic_sampling
        self.accumulator = algo.DynamicSamplingAccumulator(
            c.trainer.train_batch_size, self.G,
            max_num_gen_batches=ds.max_num_gen_batches if ds.enable else 0,
            on_cap=ds.on_cap, carry_over=ds.carry_over, filter_metric=ds.metric)
        self.data_iter = dp.PromptBatchIterator(
            self.train_records, batch_size=c.trainer.gen_batch_size, seed=c.seed,
            num_epochs=c.data.num_epochs or None, shuffle=c.data.shuffle, shard_index=0,
            shard_count=1)
        self.step = 0
        self.gen_batches_drawn = 0
        self.stop = StopFlag()  # SIGTERM (or `stop.request()`): checkpoint after this step, exit
        self.checkpoints = CheckpointStore(self.workdir, keep=c.trainer.keep_checkpoints,
                                           async_save=c.trainer.async_checkpointing)
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main,
                                    wandb=run_record.wandb_settings(c))
        self.peak_flops = c.trainer.peak_flops_per_device or peak_flops_per_device()
        self._restore_if_any()
        self.writer.resume_from(self.step)  # each step logged once, however the last run ended

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, force: bool = False) -> None:
        step = self.step
        if (not force and step % self.config.trainer.save_every) or step in self.checkpoints.all_steps():
            return
        acc_state = self.accumulator.state_dict()
        arrays = {k: v for k, v in acc_state.items() if isinstance(v, np.ndarray)}
        scalars = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in acc_state.items()
                   if not isinstance(v, np.ndarray)}
        self.checkpoints.save(step, params=self.params, opt_state=self.opt_state, arrays=arrays,
                              meta={"step": step, "gen_batches_drawn": self.gen_batches_drawn,
                                    "data_iter": self.data_iter.get_state(), "accumulator": scalars,
                                    "model_config": self.model_cfg.__dict__,
                                    "fixed_fields": {k: _field(self.config, k)
                                                     for k in RESUME_FIXED_FIELDS}})

    def _restore_if_any(self) -> None:
        step = self.checkpoints.latest_step()
        if step is None:
            return
        self._check_resumable(step, self.checkpoints.read_meta(step))
        self.params, self.opt_state, arrays, meta = self.checkpoints.restore(
            step, params_like=self.params, opt_state_like=self.opt_state)
        self.step = int(meta["step"])
        self.gen_batches_drawn = int(meta["gen_batches_drawn"])
        self.data_iter.set_state(meta["data_iter"])
        self.accumulator.load_state_dict({**meta["accumulator"], **arrays})
        self.driver.update_params(self.params)
        if self.is_main:
            print(f"resumed from {self.checkpoints.directory} at step {self.step}", flush=True)

    def _check_resumable(self, step: int, meta: dict[str, Any]) -> None:
        """Raises a UserError when the config changed a field the checkpoint's state depends on."""
        saved = dict(meta.get("fixed_fields") or {})
        if not saved and "data_iter" in meta:  # checkpoints from before fixed_fields was recorded
            loader = meta["data_iter"].get("config") or {}
            saved = {"trainer.gen_batch_size": loader.get("batch_size")}
        changed = [(k, v, _field(self.config, k)) for k, v in saved.items()
                   if v is not None and k in RESUME_FIXED_FIELDS and v != _field(self.config, k)]
        if changed:
            was = ", ".join(f"{k}={v}" for k, v, _ in changed)
            now = ", ".join(f"{k}={n}" for k, _, n in changed)
            back = " ".join(f"--config.{k}={v}" for k, v, _ in changed)
            raise UserError(f"--workdir {self.workdir} holds a checkpoint at step {step} made with "
                            f"{was}, but the config now says {now}; a resumed run must keep its "
                            f"batch sizes: set them back ({back}) or pass a new --workdir to start "
                            "over")

    # ------------------------------------------------------------------------------ the stages
    def _render(self, records: Sequence[dict]) -> dp.RenderedPrompts:
        c = self.config
        return dp.render_prompts(self.tokenizer, records, max_prompt_length=self.P,
                                 system_prompt=c.data.system_prompt,
                                 apply_chat_template=c.data.apply_chat_template,
                                 truncation=c.data.get("truncation", "left"))

    def _generation_batch(self, records: Sequence[dict], timer: _Timer | None = None
                          ) -> GenerationBatch:
        """Rollout -> reward -> shaping of one batch of prompts."""
        c, G = self.config, self.G
        timer = _Timer() if timer is None else timer
        rendered = self._render(records)
        with timer("gen"):
            result = self.driver.generate(
                [RolloutRequest(ids, n=G, max_new_tokens=c.rollout.max_new_tokens)
                 for ids in rendered.token_ids],
                seed=c.seed * 1_000_003 + self.gen_batches_drawn, sampling=self.exp.train_sampling,
                desc=f"step {self.step + 1} rollouts")
        self.gen_batches_drawn += 1
        samples = [s for group in result.samples for s in group]
        with timer("reward"):
            scored = self.reward_fn([s.text for s in samples],
                                    [rec["ground_truth"] for rec in records for _ in range(G)])
            acc = np.asarray([float(r["acc"]) for r in scored], np.float32)
            lengths = np.asarray([s.length for s in samples], np.int32)
            eos = np.asarray([s.finish_reason == "eos" for s in samples])
            shaped = algo.shape_rewards(np.asarray([float(r["score"]) for r in scored]), acc,
                                        lengths, eos, self.shaping)
        arrays = batching.pad_rows([rendered.token_ids[i // G] for i in range(len(samples))],
                                   [s.tokens for s in samples], [s.logprobs for s in samples],
                                   prompt_length=self.P, response_length=self.R,
                                   pad_id=self.exp.pad_id)
        arrays.update(acc=acc, score=shaped.score, advantages=shaped.advantages, length=lengths,
                      eos=eos.astype(np.int8), truncated=shaped.truncated.astype(np.int8),
                      in_loss=shaped.in_loss.astype(np.int8))
        return GenerationBatch(arrays, shaped.filter_metric, acc, rendered.num_truncated,
                               result.stats)

    def _device(self, minibatch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Places one host mini-batch [num_micro, micro, ...] (identical on every host) on the mesh."""
        out = {}
        for k, v in minibatch.items():
            sharding = NamedSharding(self.mesh, batch_spec(v.ndim, leading=1))
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        return out

    def _update_policy(self, batch: dict[str, np.ndarray], timer: _Timer) -> dict[str, float]:
        """Old log-probs of every mini-batch, then one optimizer update per mini-batch."""
        if self.packing:
            return self._update_packed(batch, timer)
        c = self.config
        rows = {"input_ids": np.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1),
                "attention_mask": np.concatenate([batch["prompt_mask"], batch["response_mask"]],
                                                 axis=1),
                # Overlong filtering: a truncated sample's tokens leave the loss and its count.
                "response_mask": batch["response_mask"] * batch["in_loss"][:, None].astype(np.int32),
                "rollout_logprobs": batch["rollout_logprobs"],
                "full_response_mask": batch["response_mask"],
                "advantages": batch["advantages"].astype(np.float32)}
        host = batching.minibatches(rows, mini_batch_size=c.trainer.mini_batch_size,
                                    micro_batch_size=c.trainer.micro_batch_size)
        device = [self._device(mb) for mb in host]
        with timer("old_log_prob"):
            # All old log-probs come from the weights before this step's first update.
            for mb in device:
                mb["old_logprobs"], mb["probs_diff"] = self.logprob_fn(
                    self.params, mb["input_ids"], mb["attention_mask"], mb["full_response_mask"],
                    mb["rollout_logprobs"])
            jax.block_until_ready([mb["old_logprobs"] for mb in device])
        sums: dict[str, Any] = {}
        diffs = []
        with timer("update_actor"):
            lr = jnp.float32(self.lr(self.step))
            for mb, hb in zip(device, host):
                rm = hb["response_mask"]
                mb["token_count"] = jnp.asarray(np.float32(rm.sum()))
                mb["seq_count"] = jnp.asarray(np.float32((rm.sum(axis=-1) > 0).sum()))
                diffs.append(mb.pop("probs_diff"))
                self.params, self.opt_state, metrics = self.update_fn(
                    self.params, self.opt_state, {k: mb[k] for k in self._UPDATE_FIELDS}, lr)
                sums = metrics if not sums else jax.tree.map(jnp.add, sums, metrics)
            sums = tree_to_host(sums)
        n_mini = len(device)
        out = {f"actor/{k}": float(v) / n_mini for k, v in sums.items()
               if k not in ("update_skipped", "response_tokens")}
        out["actor/updates_skipped"] = float(sums["update_skipped"])
        out["actor/num_updates"] = float(n_mini)
        # verl's sampler/trainer mismatch check, like with like: both are the policy at the
        # rollout temperature on the same tokens, so this stays at round-off unless they disagree.
        d = tree_to_host(diffs)
        total = sum(float(x[1]) for x in d)
        out["training/rollout_probs_diff_mean"] = sum(float(x[0]) for x in d) / max(total, 1.0)
        out["training/rollout_probs_diff_max"] = max(float(x[2]) for x in d)
        return out

    def _place_rows(self, micro: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Places one packed micro-batch [rows, L] (identical on every host) on the mesh."""
        sharding = NamedSharding(self.mesh, batch_spec(2))
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                for k, v in micro.items()}

    def _update_packed(self, batch: dict[str, np.ndarray], timer: _Timer) -> dict[str, float]:
        """`_update_policy` on packed token-budget micro-batches (trainer.packing)."""
        c = self.config
        n = batch["response_ids"].shape[0]
        mini = c.trainer.mini_batch_size
        prompts = [ids[m > 0] for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
        lengths = batch["response_mask"].sum(axis=1)
        responses = [ids[:k] for ids, k in zip(batch["response_ids"], lengths)]
        packed = []
        for start in range(0, max(n, 1), mini):  # the same mini-batches as the padded layout
            part = slice(start, min(start + mini, n))
            packed.append(batching.pack_minibatch(
                prompts[part], responses[part], batch["rollout_logprobs"][part],
                batch["advantages"][part], batch["in_loss"][part], self.layout,
                pad_id=self.exp.pad_id))
        with timer("old_log_prob"):
            # All old log-probs come from the weights before this step's first update.
            micro_batches, diffs = [], []
            for pm in packed:
                placed = []
                for m in range(pm.num_micro):
                    micro = self._place_rows(pm.micro(m))
                    micro["old_logprobs"], diff = self.packed_logprob_fn(
                        self.params, {k: micro[k] for k in ("input_ids", "segment_ids", "positions",
                                                            "response_mask", "rollout_logprobs")})
                    del micro["rollout_logprobs"]
                    placed.append(micro)
                    diffs.append(diff)
                micro_batches.append(placed)
            jax.block_until_ready([mb["old_logprobs"] for placed in micro_batches for mb in placed])
        per_update = []
        with timer("update_actor"):
            lr = jnp.float32(self.lr(self.step))
            for pm, placed in zip(packed, micro_batches):
                grads, sums = self.zero_fn(self.params)
                token_count = jnp.float32(pm.token_count)
                seq_count = jnp.float32(pm.seq_count)
                for micro in placed:
                    grads, sums = self.grad_fn(self.params, grads, sums, micro, token_count,
                                               seq_count)
                self.params, self.opt_state, applied = self.apply_fn(self.params, self.opt_state,
                                                                     grads, lr)
                per_update.append((sums, applied))
            per_update = tree_to_host(per_update)
        out: dict[str, float] = collections.defaultdict(float)
        n_mini = len(packed)
        for sums, applied in per_update:
            count = max(float(sums["token_count"]), 1.0)
            for k, v in sums.items():
                if k.endswith("_sum"):
                    out[f"actor/{k[:-4]}"] += float(v) / count / n_mini
            out["actor/loss"] += float(sums["loss"]) / n_mini
            out["actor/grad_norm"] += float(applied["grad_norm"]) / n_mini
            out["actor/updates_skipped"] += float(applied["update_skipped"])
        out["actor/num_updates"] = float(n_mini)
        d = tree_to_host(diffs)
        total = sum(float(x[1]) for x in d)
        out["training/rollout_probs_diff_mean"] = sum(float(x[0]) for x in d) / max(total, 1.0)
        out["training/rollout_probs_diff_max"] = max(float(x[2]) for x in d)
        # How the token budget was used: computed slots that hold sample tokens, micro-batches per
        # update, and the busiest data-parallel rank's tokens over the mean (1.0 = balanced).
        rank_tokens = sum(pm.rank_tokens for pm in packed)
        out["perf/packing_fill"] = float(np.mean([pm.fill for pm in packed]))
        out["perf/micro_batches_per_update"] = float(np.mean([pm.num_micro for pm in packed]))
        out["perf/rank_token_imbalance"] = (float(rank_tokens.max() / rank_tokens.mean())
                                            if rank_tokens.sum() > 0 else 1.0)
        out["perf/packed_row_length"] = float(max(pm.row_length for pm in packed))
        return dict(out)

    _UPDATE_FIELDS = ("input_ids", "attention_mask", "response_mask", "old_logprobs", "advantages",
                      "token_count", "seq_count")

    def train_step(self) -> dict[str, float]:
        """One training step (possibly several generation batches); returns its metrics."""
        t_step = time.perf_counter()
        timer = _Timer("gen", "reward")
        raw_acc, truncated_prompts = [], 0
        decode_tokens = 0.0
        while not self.accumulator.should_stop_sampling():
            gen = self._generation_batch(next(self.data_iter), timer)
            raw_acc.append(gen.acc)
            truncated_prompts += gen.truncated_prompts
            decode_tokens += gen.rollout_stats.get("decode_tokens", 0.0)
            if self.shaping.dynamic_sampling:
                self.accumulator.add(gen.arrays, gen.filter_metric)
            else:
                self.accumulator.add(gen.arrays, gen.filter_metric, acc=gen.acc.reshape(-1, self.G))
        batch, ds_metrics = self.accumulator.emit()
        # The sampler's weights and KV cache are not needed until the next rollout: free them so
        # the update has the memory (dapo_jax.plan budgets the phases this way).
        self.driver.release()
        update_metrics = self._update_policy(batch, timer)
        self.step += 1
        self.driver.update_params(self.params)
        timer["step"] = time.perf_counter() - t_step

        m = reporting.batch_metrics(batch, overlong_filter=self.shaping.overlong_filter)
        m.update({"data/truncated_prompts": float(truncated_prompts),
                  "data/epoch": float(self.data_iter.epoch),
                  "actor/lr": float(self.lr(self.step - 1))})
        if raw_acc:  # absent when carried-over groups filled the batch without generating
            m["train/acc_before_filter"] = float(np.concatenate(raw_acc).mean())
        m.update({k: float(v) for k, v in ds_metrics.items()})
        m.update(update_metrics)
        m.update({f"timing_s/{k}": v for k, v in timer.items()})
        train_tokens = float(batch["prompt_mask"].sum() + batch["response_mask"].sum())
        m.update(reporting.throughput_metrics(
            timing=timer, decode_tokens=decode_tokens, train_tokens=train_tokens,
            # Attention FLOPs follow the samples' mean length (what packed rows attend over).
            flops_per_token=self.model_cfg.flops_per_token(
                max(1, round(train_tokens / max(len(batch["response_mask"]), 1)))),
            peak_flops=self.peak_flops, num_devices=jax.device_count()))
        return m

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Runs the validation sets with the eval sampling settings; returns val-core/... metrics."""
        c = self.config
        metrics = {}
        for name, records in self.val_sets.items():
            if c.eval.max_problems:
                records = records[:c.eval.max_problems]
            _, m = evaluate_records(
                self.driver, self.tokenizer, records, dataset=name, n=c.eval.n,
                sampling=self.exp.eval_sampling, max_new_tokens=c.eval.max_new_tokens,
                max_prompt_length=self.P, system_prompt=c.data.system_prompt,
                apply_chat_template=c.data.apply_chat_template,
                out_dir=self.workdir / "eval" / f"step_{self.step:06d}" / name,
                scorer=datasets.DEFAULT_SCORER.get(name, c.reward.scorer), seed=c.seed + 7,
                write=self.is_main, boxed_fallback=bool(c.reward.get("boxed_fallback", False)),
                truncation=c.data.get("truncation", "left"))
            metrics.update(m)
        return metrics

    # ------------------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Trains until trainer.total_steps; returns the per-step metrics of this run."""
        c = self.config
        history = []
        stop = self.stop
        try:
            with stop.installed():
                if c.trainer.val_before_train and self.step == 0 and self.val_sets:
                    self._report(0, self.evaluate())
                bar = tqdm.tqdm(total=c.trainer.total_steps, initial=self.step, desc="DAPO steps",
                                disable=not self.progress, unit="step")
                while self.step < c.trainer.total_steps:
                    m = self.train_step()
                    final = self.step == c.trainer.total_steps
                    if c.trainer.test_freq and self.val_sets and (
                            self.step % c.trainer.test_freq == 0 or final):
                        m.update(self.evaluate())
                    history.append(m)
                    bar.clear()
                    self._report(self.step, m)
                    bar.update(1)
                    stopping = stop.agreed()
                    self._save(force=final or stopping)
                    if stopping and not final:
                        self.checkpoints.wait()
                        raise Preempted(f"stopped by SIGTERM after step {self.step}; "
                                        "checkpoint saved")
                bar.close()
                self.checkpoints.wait()
                if c.trainer.export_hf_on_finish:
                    self.export_hf(self.workdir / "hf_export" / f"step_{self.step}")
        finally:
            self.writer.flush()
        return history

    def _report(self, step: int, m: dict[str, float]) -> None:
        self.writer.write(step, m)
        if not self.is_main:
            return
        if "critic/score/mean" in m:
            print(reporting.format_step(step, self.config.trainer.total_steps, m), flush=True)
        if any(k.startswith("val-core") for k in m):
            print(reporting.format_validation(step, m), flush=True)

    def export_hf(self, path: str | os.PathLike) -> None:
        """Writes the current policy as a HF checkpoint directory (with the tokenizer, and a
        generation_config.json whose eos ids are every stop token the rollouts used)."""
        from dapo_jax.export import generation_config

        models.save_pretrained(self.params, self.model_cfg, path,
                               tokenizer_dir=self.exp.tokenizer_dir,
                               generation_config=generation_config(
                                   self.tokenizer, as_list(self.config.tokenizer.stop_tokens)))

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes the writers."""
        self.checkpoints.close()
        self.writer.close()
