"""The DAPO training loop.

One training step: draw generation batches of prompts -> n rollouts each -> rewards (math_dapo +
soft overlong punishment) -> dynamic sampling until `train_batch_size` groups vary in outcome ->
old log-probs from the training weights -> group advantages -> one AdamW update per mini-batch
(gradient accumulation with the exact global token-mean) -> new weights to the sampler -> metrics ->
checkpoint. Steps count optimizer-side training steps, never generation batches.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import data_pipeline as dp
from dapo_jax import algo, models
from dapo_jax import datasets as ds_lib
from dapo_jax.config_validation import validate_config
from dapo_jax.distributed import any_process
from dapo_jax.host_transfer import to_host, tree_to_host
from dapo_jax.metrics_writer import MetricsWriter, peak_flops_per_device
from dapo_jax.models.sharding import make_mesh
from dapo_jax.rewards.batch import score_batch
from dapo_jax.sampler import (Engine, RolloutDriver, RolloutRequest, SamplingParams,
                              out_major_option)
from dapo_jax.train_step import (LossSettings, batch_spec, build_logprob_fn, build_update_fn,
                                 init_opt_state, lr_schedule, make_optimizer)

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[dict]]

PREEMPTED_EXIT_CODE = 42  # launch/tpu.py restarts the job when it sees this


class Preempted(Exception):
    """Raised after a SIGTERM once the current step's checkpoint is saved."""


class Trainer:
    """Owns the mesh, policy, optimizer, sampler, data, dynamic-sampling state and checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, progress: bool | None = None,
                 rollout: Any = None, reward_fn: RewardFn | None = None):
        """`rollout` replaces the engine-backed RolloutDriver (same `generate`, `update_params`,
        `release` contract); `reward_fn(texts, ground_truths) -> [{"score", "acc", ...}]` replaces
        the configured scorer. The soft overlong punishment is added to its scores either way."""
        self.config = c = config
        validate_config(c, jax.device_count())
        # Orbax needs absolute paths; gs:// paths are already absolute.
        self.workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.mesh = make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor},
                              devices=jax.devices()[:c.mesh.num_devices or None])
        self.P, self.R = int(c.data.max_prompt_length), int(c.data.max_response_length)
        self.G = int(c.rollout.n)
        self._stop_requested = False

        self.train_records = ds_lib.load_records(c.data.train, c, split="train")
        self.tokenizer = self._load_tokenizer()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.stop_ids = self._stop_token_ids()
        self.model_cfg, params = self._load_policy()
        self.param_shardings = models.param_shardings(self.model_cfg, self.mesh)

        o = c.optim
        self.tx = make_optimizer(weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2,
                                 eps=o.eps)
        self.lr = lr_schedule(o.lr, o.warmup_steps)
        self.params = params
        self.opt_state, self.opt_shardings = init_opt_state(self.tx, params)
        a = c.algo
        dp_size = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.loss_settings = LossSettings(
            clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
            clip_ratio_c=a.clip_ratio_c or None, loss_agg_mode=a.loss_agg_mode,
            loss_scale_length=float(a.loss_scale_length or self.R),
            log_ratio_clamp=a.log_ratio_clamp or None,
            num_dp_ranks=dp_size if c.trainer.micro_batch_size % dp_size == 0 else 1,
            chunk_size=c.trainer.logprob_chunk_size, temperature=c.rollout.temperature)
        self.logprob_fn = build_logprob_fn(self.model_cfg, self.mesh, self.param_shardings, self.P,
                                           c.trainer.logprob_chunk_size,
                                           temperature=c.rollout.temperature)
        self.update_fn = build_update_fn(self.model_cfg, self.tx, self.mesh, self.param_shardings,
                                         self.opt_shardings, self.P, self.loss_settings)

        r = c.rollout
        self.train_sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        self.eval_sampling = SamplingParams(temperature=c.eval.temperature, top_p=c.eval.top_p,
                                            top_k=c.eval.top_k)
        self.engine = Engine(self.model_cfg, max_concurrent_decodes=r.max_concurrent_decodes,
                             max_prefill_length=self.P, max_target_length=self.P + self.R,
                             stop_token_ids=self.stop_ids, pad_token_id=self.pad_id,
                             sampling=self.train_sampling, mesh=self.mesh, cache_dtype=r.cache_dtype,
                             per_layer_weights=r.per_layer_weights,
                             out_major_weights=out_major_option(r.get("out_major_weights", "auto")))
        self.driver = rollout if rollout is not None else RolloutDriver(
            self.engine, self.params, steps_per_sync=r.steps_per_sync, tokenizer=self.tokenizer,
            progress=self.progress)
        self.reward_fn = reward_fn if reward_fn is not None else self._configured_reward

        ds = a.dynamic_sampling
        self.accumulator = algo.DynamicSamplingAccumulator(
            c.trainer.train_batch_size, self.G,
            max_num_gen_batches=ds.max_num_gen_batches if ds.enable else 0,
            on_cap=ds.on_cap, carry_over=ds.carry_over, filter_metric=ds.metric)
        self.data_iter = dp.PromptBatchIterator(
            self.train_records, batch_size=c.trainer.gen_batch_size, seed=c.seed,
            num_epochs=c.data.num_epochs or None, shuffle=c.data.shuffle, shard_index=0,
            shard_count=1)
        self.val_sets = {ds_lib.dataset_name(v): ds_lib.load_records(v, c, split="val")
                         for v in (c.data.val or [])}
        self.step = 0
        self.gen_batches_drawn = 0
        self.ckpt = ocp.CheckpointManager(
            os.fspath(self.workdir / "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=c.trainer.keep_checkpoints,
                enable_async_checkpointing=c.trainer.async_checkpointing))
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main)
        self.peak_flops = c.trainer.peak_flops_per_device or peak_flops_per_device()
        self._restore_if_any()

    # ------------------------------------------------------------------------------ setup helpers
    def _load_tokenizer(self):
        c = self.config
        path = c.tokenizer.path or c.model.path
        if not path and c.data.train == "toy":
            path = os.fspath(self.workdir / "toy_tokenizer")
            # Process 0 builds it into the shared workdir; the others wait for its files.
            if self.is_main and not (epath.Path(path) / "tokenizer.json").exists():
                corpus = []
                for rec in self.train_records[:2000]:
                    corpus.append(dp.render_prompt_text(_NoTemplate(), rec, apply_chat_template=False))
                    corpus.append(dp.toy_worked_solution(rec))
                dp.build_toy_tokenizer(path, corpus)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("dapo_jax: toy tokenizer written")
        if not path:
            raise ValueError("config.tokenizer.path is empty and config.model.path is empty: set one "
                             "to a folder with tokenizer.json (e.g. ../shared/data/tokenizers/qwen2.5)")
        return models.load_tokenizer(path)

    def _stop_token_ids(self) -> list[int]:
        ids = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        vocab = self.tokenizer.get_vocab()
        for tok in self.config.tokenizer.stop_tokens:
            if tok in vocab and vocab[tok] not in ids:
                ids.append(int(vocab[tok]))
        if not ids:
            raise ValueError("no stop tokens: the tokenizer has no EOS and none of "
                             f"config.tokenizer.stop_tokens={list(self.config.tokenizer.stop_tokens)} "
                             "is in its vocabulary")
        return ids

    def _model_overrides(self) -> dict[str, Any]:
        m = self.config.model
        return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers)

    def _load_overrides(self) -> dict[str, Any]:
        m = self.config.model
        return dict(dtype=m.param_dtype, compute_dtype=m.dtype, remat=m.remat,
                    scan_layers=m.scan_layers)

    def _load_policy(self):
        c = self.config
        if c.model.path:
            model, cfg = models.load_pretrained(c.model.path, mesh=self.mesh,
                                                **self._load_overrides())
            return cfg, model.params()
        overrides = self._model_overrides()
        vocab = c.model.vocab_size or 0
        if not vocab:
            vocab = int(math.ceil(len(self.tokenizer) / 64) * 64)
        overrides["vocab_size"] = vocab
        cfg = models.preset(c.model.preset, **overrides)
        if len(self.tokenizer) > cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the model vocabulary is "
                             f"{cfg.vocab_size}; set config.model.vocab_size")
        model = models.init_model(cfg, mesh=self.mesh, seed=c.seed)
        params = model.params()
        ws = c.get("warm_start")
        if ws is not None and ws.steps > 0:
            params = self._warm_start(cfg, params)
        return cfg, params

    def _warm_start(self, cfg, params):
        """Supervised warm start on worked toy solutions, cached as a HF checkpoint in the workdir."""
        from dapo_jax.warm_start import supervised_warm_start, warm_start_examples
        c = self.config
        cache = self.workdir / "warm_start"
        if (cache / "config.json").exists():
            log.info("warm start: reusing %s", cache)
            model, _ = models.load_pretrained(cache, mesh=self.mesh, **self._load_overrides())
            return model.params()
        recs = self.train_records
        rendered = dp.render_prompts(self.tokenizer, recs, max_prompt_length=self.P,
                                     system_prompt=c.data.system_prompt,
                                     apply_chat_template=c.data.apply_chat_template)
        eos = self.stop_ids[0]
        index, texts, weights = warm_start_examples(recs, format_noise=c.warm_start.format_noise)
        responses = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        t0 = time.time()
        params, losses = supervised_warm_start(
            params, cfg, [rendered.token_ids[i] for i in index], responses,
            steps=c.warm_start.steps, batch_size=c.warm_start.batch_size, lr=c.warm_start.lr,
            seed=c.seed, pad_id=self.pad_id, weights=weights, progress=self.progress)
        params = jax.device_put(params, models.param_shardings(cfg, self.mesh))
        if self.is_main:
            print(f"warm start: {c.warm_start.steps} SFT steps in {time.time() - t0:.0f}s, "
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; cached in {cache}", flush=True)
        models.save_pretrained(params, cfg, cache, tokenizer_dir=None)
        return params

    def _configured_reward(self, texts: list[str], truths: list[str]) -> list[dict]:
        """The config's rule-based scorer (math_dapo by default) over one generation batch."""
        c = self.config
        return score_batch(texts, truths, scorer=c.reward.scorer,
                           num_workers=c.reward.num_workers or None,
                           boxed_fallback=c.reward.boxed_fallback)

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, force: bool = False) -> None:
        step = self.step
        if not force and step % self.config.trainer.save_every:
            return
        if step in (self.ckpt.all_steps() or []):
            return
        acc_state = self.accumulator.state_dict()
        arrays = {k: v for k, v in acc_state.items() if isinstance(v, np.ndarray) and v.size}
        arrays["_present"] = np.ones((1,), np.int8)
        scalars = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in acc_state.items()
                   if not isinstance(v, np.ndarray)}
        meta = {"step": step, "gen_batches_drawn": self.gen_batches_drawn,
                "data_iter": self.data_iter.get_state(), "accumulator": scalars,
                "accumulator_arrays": sorted(arrays), "model_config": self.model_cfg.__dict__}
        self.ckpt.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params), opt_state=ocp.args.StandardSave(self.opt_state),
            accumulator=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    def _restore_if_any(self) -> None:
        step = self.ckpt.latest_step()
        if step is None:
            return
        abstract = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        restored = self.ckpt.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(self.params)),
            opt_state=ocp.args.StandardRestore(abstract(self.opt_state)),
            accumulator=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore()))
        self.params, self.opt_state = restored.params, restored.opt_state
        meta = restored.meta
        self.step = int(meta["step"])
        self.gen_batches_drawn = int(meta["gen_batches_drawn"])
        self.data_iter.set_state(meta["data_iter"])
        state = dict(meta["accumulator"])
        state.update({k: np.asarray(v) for k, v in restored.accumulator.items() if k != "_present"})
        self.accumulator.load_state_dict(state)
        self.driver.update_params(self.params)
        if self.is_main:
            print(f"resumed from {self.workdir / 'checkpoints'} at step {self.step}", flush=True)

    # ------------------------------------------------------------------------------ one step
    def _render(self, records):
        c = self.config
        return dp.render_prompts(self.tokenizer, records, max_prompt_length=self.P,
                                 system_prompt=c.data.system_prompt,
                                 apply_chat_template=c.data.apply_chat_template)

    def _generation_batch(self, records) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
        """Rollouts + rewards for one generation batch: (per-sample arrays, filter metric, stats)."""
        c, G, P, R = self.config, self.G, self.P, self.R
        timings = {}
        rendered = self._render(records)
        t0 = time.perf_counter()
        result = self.driver.generate(
            [RolloutRequest(ids, n=G, max_new_tokens=c.rollout.max_new_tokens)
             for ids in rendered.token_ids],
            seed=c.seed * 1_000_003 + self.gen_batches_drawn, sampling=self.train_sampling,
            desc=f"step {self.step + 1} rollouts")
        self.gen_batches_drawn += 1
        timings["gen"] = time.perf_counter() - t0
        samples = [s for group in result.samples for s in group]
        t0 = time.perf_counter()
        truths = [rec["ground_truth"] for rec in records for _ in range(G)]
        scored = self.reward_fn([s.text for s in samples], truths)
        acc = np.asarray([float(r["acc"]) for r in scored], np.float32)
        score = np.asarray([float(r["score"]) for r in scored], np.float32)
        lengths = np.asarray([s.length for s in samples], np.int32)
        eos = np.asarray([s.finish_reason == "eos" for s in samples])
        if c.algo.overlong_buffer.enable:
            score = score + np.asarray(algo.overlong_penalty(
                lengths, max_response_length=R, overlong_buffer_len=c.algo.overlong_buffer.len,
                penalty_factor=c.algo.overlong_buffer.penalty_factor))
        timings["reward"] = time.perf_counter() - t0
        n = len(samples)
        prompt_ids = np.full((n, P), self.pad_id, np.int32)
        prompt_mask = np.zeros((n, P), np.int32)
        resp_ids = np.full((n, R), self.pad_id, np.int32)
        resp_mask = np.zeros((n, R), np.int32)
        rollout_lp = np.zeros((n, R), np.float32)
        for i, s in enumerate(samples):
            p = rendered.token_ids[i // G]
            prompt_ids[i, P - len(p):] = p
            prompt_mask[i, P - len(p):] = 1
            resp_ids[i, :s.length] = s.tokens
            resp_mask[i, :s.length] = 1
            rollout_lp[i, :s.length] = s.logprobs
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": resp_ids,
                 "response_mask": resp_mask, "rollout_logprobs": rollout_lp, "acc": acc,
                 "score": score, "length": lengths, "eos": eos.astype(np.int8)}
        metric = (acc if c.algo.dynamic_sampling.metric == "acc" else score).reshape(-1, G)
        stats = {"timings": timings, "acc": acc, "lengths": lengths, "eos": eos,
                 "truncated_prompts": rendered.num_truncated, "rollout": result.stats}
        return batch, metric, stats

    def _device_batch(self, arrays: dict[str, np.ndarray], leading: int = 0) -> dict[str, jax.Array]:
        """Places host arrays (identical on every host) as global arrays sharded over the batch."""
        out = {}
        for k, v in arrays.items():
            sharding = NamedSharding(self.mesh, batch_spec(v.ndim, leading))
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        return out

    def _old_logprobs(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs (and entropies) of the responses under the current training weights."""
        n = batch["response_ids"].shape[0]
        mb = self.config.trainer.micro_batch_size
        ids = np.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)
        mask = np.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
        lps, ents = [], []
        for s in range(0, n, mb):
            e = min(n, s + mb)
            pad = mb - (e - s)
            chunk = {"ids": ids[s:e], "mask": mask[s:e], "resp": batch["response_mask"][s:e]}
            if pad:
                chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                         for k, v in chunk.items()}
            d = self._device_batch(chunk)
            lp, ent = self.logprob_fn(self.params, d["ids"], d["mask"], d["resp"])
            lps.append(to_host(lp)[:e - s])
            ents.append(to_host(ent)[:e - s])
        return np.concatenate(lps), np.concatenate(ents)

    def train_step(self) -> dict[str, float]:
        """Runs one training step (possibly several generation batches) and returns its metrics."""
        c, G = self.config, self.G
        t_step = time.perf_counter()
        timing = {"gen": 0.0, "reward": 0.0}
        raw_acc, gen_lengths, gen_eos, truncated_prompts = [], [], [], 0
        rollout_stats = {"decode_tokens": 0.0, "prefill_tokens": 0.0}
        while not self.accumulator.should_stop_sampling():
            records = next(self.data_iter)
            batch, metric, stats = self._generation_batch(records)
            for k, v in stats["timings"].items():
                timing[k] += v
            raw_acc.append(stats["acc"])
            gen_lengths.append(stats["lengths"])
            gen_eos.append(stats["eos"])
            truncated_prompts += stats["truncated_prompts"]
            for k in rollout_stats:
                rollout_stats[k] += stats["rollout"].get(k, 0.0)
            if c.algo.dynamic_sampling.enable:
                self.accumulator.add(batch, metric)
            else:
                # No filtering: every group counts (the accumulator still batches and carries over).
                self.accumulator.add(batch, np.tile(np.arange(G, dtype=np.float32), (metric.shape[0], 1)),
                                     acc=batch["acc"].reshape(-1, G))
        batch, ds_metrics = self.accumulator.emit()
        # The sampler's weights and KV cache are not needed until the next rollout: free them so
        # the update has the memory (dapo_jax.plan budgets the phases this way).
        self.driver.release()

        t0 = time.perf_counter()
        old_lp, _ = self._old_logprobs(batch)
        timing["old_log_prob"] = time.perf_counter() - t0
        # verl's sampler/trainer mismatch check: both score the same tokens with the same weights,
        # so this stays near float round-off unless the two disagree on context or numerics.
        valid = batch["response_mask"] > 0
        probs_diff = np.abs(np.exp(batch["rollout_logprobs"]) - np.exp(old_lp))[valid]

        n = batch["score"].shape[0]
        adv = np.asarray(algo.compute_grpo_advantages(batch["score"].reshape(-1, G),
                                                      eps=c.algo.adv_eps,
                                                      norm_by_std=c.algo.norm_adv_by_std)).reshape(n)
        resp_mask = batch["response_mask"].copy()
        truncated = (batch["eos"] == 0) & (batch["length"] >= c.rollout.max_new_tokens)
        if c.algo.overlong_filter:
            resp_mask = np.asarray(algo.overlong_filter_mask(resp_mask, truncated))

        t0 = time.perf_counter()
        update_metrics = self._update(batch, old_lp, adv, resp_mask)
        timing["update_actor"] = time.perf_counter() - t0
        self.step += 1
        self.driver.update_params(self.params)
        timing["step"] = time.perf_counter() - t_step

        raw = np.concatenate(raw_acc) if raw_acc else np.zeros(0)
        lengths = batch["length"].astype(np.float64)
        m: dict[str, float] = {
            "critic/score/mean": float(batch["score"].mean()),
            "critic/score/max": float(batch["score"].max()),
            "critic/score/min": float(batch["score"].min()),
            "critic/acc/mean": float(batch["acc"].mean()),
            "critic/advantages/mean": float(adv.mean()),
            "critic/advantages/max": float(adv.max()),
            "critic/advantages/min": float(adv.min()),

            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "response_length/clip_ratio": float(truncated.mean()),
            "train/overlong_filtered": float(truncated.sum()) if c.algo.overlong_filter else 0.0,
            "data/truncated_prompts": float(truncated_prompts),
            "data/epoch": float(self.data_iter.epoch),
            "actor/lr": float(self.lr(self.step - 1)),
            "train/num_samples": float(n),
            "training/rollout_probs_diff_mean": float(probs_diff.mean()) if probs_diff.size else 0.0,
            "training/rollout_probs_diff_max": float(probs_diff.max()) if probs_diff.size else 0.0,
        }
        if raw.size:  # absent when carried-over groups filled the batch without generating
            m["train/acc_before_filter"] = float(raw.mean())
        m.update({k: float(v) for k, v in ds_metrics.items()})
        m.update(update_metrics)
        m.update({f"timing_s/{k}": v for k, v in timing.items()})
        m["perf/rollout_tokens_per_s"] = rollout_stats["decode_tokens"] / max(timing["gen"], 1e-9)
        train_tokens = float((batch["prompt_mask"].sum() + batch["response_mask"].sum()))
        m["perf/train_tokens_per_s"] = train_tokens / max(timing["update_actor"], 1e-9)
        flops = 3 * train_tokens * self.model_cfg.flops_per_token(self.P + self.R)
        if self.peak_flops:
            m["perf/mfu"] = flops / max(timing["update_actor"], 1e-9) / (
                self.peak_flops * jax.device_count())
        return m

    def _update(self, batch, old_lp, adv, resp_mask) -> dict[str, float]:
        """One optimizer update per mini-batch (padded with empty rows when the batch is short)."""
        c = self.config
        mini, micro = c.trainer.mini_batch_size, c.trainer.micro_batch_size
        ids = np.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)
        attn = np.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
        n = ids.shape[0]
        n_mini = max(1, math.ceil(n / mini))
        pad = n_mini * mini - n
        arrays = {"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask,
                  "old_logprobs": old_lp.astype(np.float32), "advantages": adv.astype(np.float32)}
        if pad:
            arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                      for k, v in arrays.items()}
        sums: dict[str, float] = {}
        lr = self.lr(self.step)
        for k in range(n_mini):
            sl = slice(k * mini, (k + 1) * mini)
            part = {name: v[sl].reshape((mini // micro, micro) + v.shape[1:]) for name, v in
                    arrays.items()}
            rm = arrays["response_mask"][sl]
            token_count = np.float32(rm.sum())
            seq_count = np.float32((rm.sum(axis=1) > 0).sum())
            mb = self._device_batch(part, leading=1)
            mb["token_count"] = jnp.asarray(token_count)
            mb["seq_count"] = jnp.asarray(seq_count)
            self.params, self.opt_state, metrics = self.update_fn(self.params, self.opt_state, mb,
                                                                  jnp.float32(lr))
            for name, v in tree_to_host(metrics).items():
                sums[name] = sums.get(name, 0.0) + float(v)
        out = {f"actor/{k}": v / n_mini for k, v in sums.items()
               if k not in ("update_skipped", "response_tokens")}
        out["actor/updates_skipped"] = sums.get("update_skipped", 0.0)
        out["actor/num_updates"] = float(n_mini)
        return out

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Runs the validation sets with the eval sampling settings; returns val-core/... metrics."""
        from dapo_jax.evaluate import evaluate_records
        c = self.config
        metrics = {}
        for name, records in self.val_sets.items():
            if c.eval.max_problems:
                records = records[:c.eval.max_problems]
            out_dir = self.workdir / "eval" / f"step_{self.step:06d}" / name
            summary, m = evaluate_records(
                self.driver, self.tokenizer, records, dataset=name, n=c.eval.n,
                sampling=self.eval_sampling, max_new_tokens=c.eval.max_new_tokens,
                max_prompt_length=self.P, system_prompt=c.data.system_prompt,
                apply_chat_template=c.data.apply_chat_template, out_dir=out_dir,
                scorer=ds_lib.DEFAULT_SCORER.get(name, c.reward.scorer), seed=c.seed + 7,
                write=self.is_main)
            self.driver.engine.sampling = self.train_sampling
            metrics.update(m)
        return metrics

    # ------------------------------------------------------------------------------ the loop
    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._stop_requested = True
        log.warning("SIGTERM received: finishing the current step, then checkpointing and exiting")

    def train(self) -> list[dict[str, float]]:
        """Trains until trainer.total_steps; returns the per-step metrics of this run."""
        c = self.config
        history = []
        previous = None
        try:
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread
            pass
        try:
            if c.trainer.val_before_train and self.step == 0 and self.val_sets:
                val = self.evaluate()
                self.writer.write(0, val)
                if self.is_main:
                    print(_format_val(0, val), flush=True)
            bar = tqdm.tqdm(total=c.trainer.total_steps, initial=self.step, desc="DAPO steps",
                            disable=not self.progress, unit="step")
            while self.step < c.trainer.total_steps:
                m = self.train_step()
                if c.trainer.test_freq and self.val_sets and (
                        self.step % c.trainer.test_freq == 0 or self.step == c.trainer.total_steps):
                    m.update(self.evaluate())
                self.writer.write(self.step, m)
                history.append(m)
                if self.is_main:
                    bar.clear()
                    print(_format_step(self.step, c.trainer.total_steps, m), flush=True)
                    if any(k.startswith("val-core") for k in m):
                        print(_format_val(self.step, m), flush=True)
                bar.update(1)
                final = self.step == c.trainer.total_steps
                # SIGTERM reaches hosts at different moments: all stop after the same step, or the
                # ones that go on wait forever in a collective for the ones that stopped.
                stop = any_process(self._stop_requested)
                self._save(force=final or stop)
                if stop and not final:
                    self.ckpt.wait_until_finished()
                    raise Preempted(f"stopped by SIGTERM after step {self.step}; checkpoint saved")
            bar.close()
            self.ckpt.wait_until_finished()
            if c.trainer.export_hf_on_finish:
                self.export_hf(self.workdir / "hf_export" / f"step_{self.step}")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.writer.flush()
        return history

    def export_hf(self, path) -> None:
        """Writes the current policy as a HF checkpoint directory (with the tokenizer)."""
        tok_dir = self.workdir / "toy_tokenizer"
        if self.config.tokenizer.path or self.config.model.path:
            tok_dir = self.config.tokenizer.path or self.config.model.path
        models.save_pretrained(self.params, self.model_cfg, path, tokenizer_dir=tok_dir)

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes the writers."""
        self.ckpt.wait_until_finished()
        self.ckpt.close()
        self.writer.close()


class _NoTemplate:
    """A stand-in tokenizer for rendering raw prompt text (no chat template) into the toy corpus."""


def _format_step(step: int, total: int, m: dict[str, float]) -> str:
    acc = m.get("train/acc_before_filter")
    return (f"step {step}/{total} | score {m['critic/score/mean']:+.3f} | acc(before filter) "
            f"{'  n/a' if acc is None else f'{acc:.3f}'} | len {m['response_length/mean']:.1f} | "
            f"entropy {m.get('actor/entropy', 0):.3f} | clipfrac {m.get('actor/pg_clipfrac', 0):.4f} | "
            f"kl {m.get('actor/ppo_kl', 0):+.5f} | grad {m.get('actor/grad_norm', 0):.3f} | "
            f"gen batches {m.get('train/num_gen_batches', 0):.0f} | {m['timing_s/step']:.1f}s")


def _format_val(step: int, m: dict[str, float]) -> str:
    parts = [f"{k.split('/')[1]} {k.split('/')[-1]}={v:.3f}" for k, v in sorted(m.items())
             if k.startswith("val-core") and "/acc/mean@" in k]
    return f"validation @ step {step}: " + ", ".join(parts)

