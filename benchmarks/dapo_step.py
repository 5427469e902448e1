"""A whole DAPO step: our `Trainer.train_step()` against TRL's `GRPOTrainer(loss_type="dapo")`.

Settings are made equal: the same architecture and weights (ours exported with
`models.save_pretrained` and loaded by transformers), the same rendered prompt token ids (TRL's
prompt tokenizer is replaced by a lookup of ours) and the same prompts in the same order, the same
stop tokens (`generation_config.eos_token_id`), P prompts x G samples (16 x 8), the same maximum
new tokens, temperature 1 / top-p 1 / no top-k, beta 0, clip 0.2 / 0.28, token-mean ("dapo") loss,
truncated samples masked out of the loss (our overlong filter; TRL's mask_truncated_completions),
float32, no gradient checkpointing, and two optimizer updates per generation batch (ours:
mini_batch_size = P x G / 2; TRL: per_device_train_batch_size = P x G / 2, steps_per_generation
= 2, so it computes old log-probs too). Both score with our math_dapo reward (TRL without the
soft overlong penalty: a reward shape, not work).

`--equal_work` makes every completion run to its maximum length for both: our sampler's stop id is
a token the model cannot produce, TRL generates with `min_new_tokens = max_completion_length`; both
keep truncated samples in the loss. Lengths are checked.

The first `--warmup` steps (our compilation, TRL's first step) are reported apart; the table gives
the median of the next `--steps`. Ours is split into rollout / old log-probs / update from its
`timing_s/*` metrics; TRL's into generate (`_generate_single_turn`), the rest of its generation
batch (reward, old log-probs) and the two optimizer steps.

    python -m benchmarks.dapo_step                                   # toy, 40 and 128 new tokens
    python -m benchmarks.dapo_step --equal_work
    python -m benchmarks.dapo_step --preset qwen2.5-0.5b --short     # 0.5B shape, 4 x 4, 16 tokens
    python -m benchmarks.dapo_step --smoke --skip_trl

TRL and its needs are optional: `pip install -r requirements-bench.txt`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

COLUMNS = ["setting", "ours s/step", "ours gen / old-logp / update s", "TRL s/step",
           "TRL gen / score+old-logp / update s", "TRL / ours", "ours first step s",
           "TRL first step s"]
MISSING_TRL = ("TRL is not installed: pip install -r requirements-bench.txt (or run with "
               "--skip_trl to time our trainer only)")
QWEN_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                              "shared", "data", "tokenizers", "qwen2.5")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One table row: model preset, batch shape, response budget, and whether lengths are forced."""

    preset: str
    prompts: int
    samples: int
    max_new_tokens: int
    equal_work: bool = False

    @property
    def label(self) -> str:
        """A short row name, e.g. `toy 16x8, 40 new, equal work`."""
        work = ", equal work" if self.equal_work else ""
        return f"{self.preset} {self.prompts}x{self.samples}, {self.max_new_tokens} new{work}"


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="toy", help="toy (warm-started) or a size preset (random)")
    p.add_argument("--max_new_tokens", type=_csv_ints, default=[40, 128],
                   help="comma-separated maximum response lengths, one row each")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (group size)")
    p.add_argument("--equal_work", action="store_true",
                   help="every completion runs to max_new_tokens (no stop token) for both, and "
                        "truncated samples stay in the loss; always on for random-weight presets")
    p.add_argument("--short", action="store_true",
                   help="affordable on CPU for big presets: 4 prompts x 4 samples, 16 new tokens, "
                        "1 timed step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dapo_step_bench"),
                   help="cache of the toy data, tokenizer and warm start (reused between runs)")
    p.add_argument("--tokenizer", default=QWEN_TOKENIZER,
                   help="tokenizer folder for non-toy presets")
    p.add_argument("--skip_trl", action="store_true", help="time our trainer only")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch.set_num_threads for TRL; default: every core (as JAX), or 1 when "
                        "the 1-minute load average is at least the core count (torch's threads "
                        "collapse on a busy machine; one thread is then its faster setting)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a jax.profiler trace of our timed steps to DIR")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long: toy without warm start, 2 x 4 samples, 8 new tokens, 1 step")
    args = p.parse_args(argv)
    if args.short:
        args.prompts, args.samples, args.max_new_tokens, args.steps = 4, 4, [16], 1
    if args.smoke:
        args.preset, args.prompts, args.samples, args.max_new_tokens = "toy", 2, 4, [8]
        args.steps, args.warmup = 1, 1
    if args.preset != "toy" and not args.equal_work:
        # Random weights (every preset but the toy) almost never emit a stop token, so every
        # completion is truncated and the overlong filter (ours) / mask_truncated_completions
        # (TRL) would leave nothing in the loss: we would skip the update's work and TRL would
        # not. Keep the truncated samples in the loss on both sides instead.
        print("note: random-weight preset: timing with --equal_work (see --help)")
        args.equal_work = True
    if args.torch_threads is None:
        cores = os.cpu_count() or 1
        args.torch_threads = 1 if os.getloadavg()[0] >= cores else cores
    if args.prompts * args.samples % 2:
        p.error("--prompts x --samples must be even: each step makes two optimizer updates")
    return args


# ------------------------------------------------------------------------------------ our side
def bench_config(s: Setting, *, tokenizer: str, smoke: bool = False) -> ml_collections.ConfigDict:
    """configs/toy.py at the benchmark's settings (TRL gets the same ones in `trl_config`)."""
    from configs.toy import get_config

    c = get_config("dapo")
    n = s.prompts * s.samples
    c.rollout.n = s.samples
    c.trainer.train_batch_size = c.trainer.gen_batch_size = s.prompts
    c.trainer.mini_batch_size = c.trainer.micro_batch_size = n // 2  # two updates per step
    c.algo.dynamic_sampling.enable = False  # TRL has no dynamic sampling: one batch per step
    c.data.max_response_length = s.max_new_tokens
    c.algo.overlong_buffer.len = min(int(c.algo.overlong_buffer.len), s.max_new_tokens // 2)
    if s.equal_work:  # every sample is truncated: keep them in the loss, as TRL then does
        c.algo.overlong_filter = False
    c.trainer.val_before_train = False
    c.trainer.test_freq = 0
    c.trainer.total_steps = 1000
    c.optim.warmup_steps = 1
    if s.preset != "toy":  # a size preset with random weights and a real tokenizer
        from dapo_jax.models.config import preset
        c.model.preset = s.preset
        c.model.vocab_size = preset(s.preset).vocab_size  # the real shape, not the tokenizer's
        c.tokenizer.path = tokenizer
        c.data.max_prompt_length = 128  # Qwen's chat template adds a system prompt
        c.rollout.max_concurrent_decodes = n  # every sample at once, no larger KV cache
        # Log-probs are projected onto the vocabulary only for chunks that hold response tokens
        # (TRL: logits_to_keep); 64-token chunks keep a 16-token response to one chunk per row.
        c.trainer.logprob_chunk_size = 64
        c.warm_start.steps = 0
    if smoke:
        c.warm_start.steps = 0
        c.data.toy.num_train, c.data.toy.num_heldout = 64, 8
        c.trainer.packing_row_buckets = 1  # fewer programs to compile
    return c


class RecordingIterator:
    """The trainer's prompt-batch iterator, remembering every batch it hands out (for TRL)."""

    def __init__(self, it: Any):
        self.it, self.batches = it, []

    def __iter__(self) -> "RecordingIterator":
        return self

    def __next__(self) -> list[dict]:
        batch = list(next(self.it))
        self.batches.append(batch)
        return batch

    def __getattr__(self, name: str) -> Any:  # epoch, get_state, ...
        return getattr(self.it, name)


def _no_stop_driver(trainer: Any) -> Any:
    """A rollout driver like the trainer's, whose stop id is outside the vocabulary: every sample
    runs to its maximum length."""
    from dapo_jax import experiment
    from dapo_jax.sampler import RolloutDriver

    c = trainer.config
    engine = experiment.make_engine(c, trainer.model_cfg, trainer.mesh,
                                    stop_ids=[trainer.model_cfg.vocab_size],
                                    pad_id=trainer.exp.pad_id)
    return RolloutDriver(engine, trainer.params, steps_per_sync=c.rollout.steps_per_sync,
                         tokenizer=trainer.tokenizer, progress=False)


def run_ours(s: Setting, config: ml_collections.ConfigDict, workdir: str, *, steps: int,
             warmup: int, hf_dir: str | None, profile: str | None = None) -> dict[str, Any]:
    """Times our `Trainer.train_step()`; exports the starting weights to `hf_dir` when given.

    Returns per-step seconds (wall, gen, old_log_prob, update_actor), the first steps' seconds, the
    mean response length, and what TRL needs to run the same step (prompt ids, records, stop ids).
    """
    from dapo_jax import models
    from dapo_jax.training.trainer import Trainer

    trainer = Trainer(config, workdir, progress=False)
    try:
        stop_ids, pad_id = list(trainer.exp.stop_ids), trainer.exp.pad_id
        if hf_dir is not None:  # the weights both sides start from
            models.save_pretrained(trainer.params, trainer.model_cfg, hf_dir,
                                   tokenizer_dir=trainer.exp.tokenizer_dir,
                                   generation_config={"eos_token_id": stop_ids,
                                                      "pad_token_id": pad_id})
        if s.equal_work:
            trainer.driver.release()
            trainer.driver = _no_stop_driver(trainer)
        trainer.data_iter = recorder = RecordingIterator(trainer.data_iter)
        first, timed = [], []
        for i in range(warmup + steps):
            if profile is not None and i == warmup:
                jax.profiler.start_trace(profile)
            t0 = time.perf_counter()
            m = trainer.train_step()
            wall = time.perf_counter() - t0
            if profile is not None and i == warmup + steps - 1:
                jax.profiler.stop_trace()
            row = {"step": wall, "gen": m["timing_s/gen"] + m["timing_s/reward"],
                   "old_log_prob": m["timing_s/old_log_prob"],
                   "update": m["timing_s/update_actor"],
                   "response_length": m["response_length/mean"],
                   # share of the computed token slots that hold sample tokens (NaN: unpacked)
                   "packing_fill": m.get("perf/packing_fill", float("nan"))}
            (first if i < warmup else timed).append(row)
        if s.equal_work and any(r["response_length"] != s.max_new_tokens for r in first + timed):
            raise RuntimeError(f"equal work: our responses are not all {s.max_new_tokens} tokens")
        records = [r for b in recorder.batches for r in b]
        prompt_ids = [list(map(int, ids)) for ids in trainer._render(records).token_ids]
        return {"first": first, "timed": timed, "records": records, "prompt_ids": prompt_ids,
                "stop_ids": stop_ids}
    finally:
        trainer.close()
        trainer.driver.release()
        del trainer
        gc.collect()
        jax.clear_caches()


# ------------------------------------------------------------------------------------ TRL's side
def trl_available() -> bool:
    """Whether TRL (and so torch and datasets) can be imported."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def trl_config(s: Setting, config: ml_collections.ConfigDict, output_dir: str, total_steps: int):
    """GRPOConfig at our settings: DAPO loss, beta 0, clip 0.2/0.28, two updates per generation."""
    from trl import GRPOConfig

    c, n = config, s.prompts * s.samples
    kwargs: dict[str, Any] = {}
    if s.equal_work:  # EOS suppressed until the budget is reached: every completion is full length
        kwargs["generation_kwargs"] = {"min_new_tokens": s.max_new_tokens}
    return GRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        seed=int(c.seed), learning_rate=float(c.optim.lr), lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=float(c.optim.weight_decay), adam_beta1=float(c.optim.b1),
        adam_beta2=float(c.optim.b2), adam_epsilon=float(c.optim.eps),
        max_grad_norm=float(c.optim.grad_clip), per_device_train_batch_size=n // 2,
        gradient_accumulation_steps=1, steps_per_generation=2, num_iterations=1,
        num_generations=s.samples, max_completion_length=s.max_new_tokens,
        temperature=float(c.rollout.temperature), top_p=float(c.rollout.top_p),
        top_k=int(c.rollout.top_k), beta=0.0, epsilon=float(c.algo.clip_ratio_low),
        epsilon_high=float(c.algo.clip_ratio_high), loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=bool(c.algo.overlong_filter), shuffle_dataset=False,
        max_steps=total_steps, logging_steps=10**6, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **kwargs)


def _timed_method(obj: Any, name: str, sink: list[float],
                  on_result: Callable[[Any], None] | None = None) -> None:
    """Wraps `obj.name` so each call appends its seconds to `sink` (and hands its result to
    `on_result`)."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        sink.append(time.perf_counter() - t0)
        if on_result is not None:
            on_result(out)
        return out

    setattr(obj, name, wrapper)


def run_trl(s: Setting, config: ml_collections.ConfigDict, hf_dir: str, ours: dict[str, Any], *,
            steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Times TRL's GRPOTrainer on the prompts our trainer drew, in the same order."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOTrainer

    from dapo_jax.training.trainer import configured_reward

    torch.set_num_threads(threads)
    torch.manual_seed(int(config.seed))
    n_steps = warmup + steps
    records = ours["records"][:n_steps * s.prompts]
    ids_of = {f"p{i}": ids for i, ids in enumerate(ours["prompt_ids"][:len(records)])}
    dataset = Dataset.from_dict({"prompt": list(ids_of),
                                 "ground_truth": [r["ground_truth"] for r in records]})
    score = configured_reward(config)

    def dapo_reward(prompts, completions, ground_truth, **_):
        return [float(r["score"]) for r in score(list(completions), list(ground_truth))]

    class SamePromptIds(GRPOTrainer):
        """GRPOTrainer fed our rendered prompt ids (the dataset's prompt is their key)."""

        def _tokenize_prompts(self, prompts):
            return [list(ids_of[p]) for p in prompts], None, {}

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    with tempfile.TemporaryDirectory() as out:
        trainer = SamePromptIds(model=model, reward_funcs=dapo_reward, processing_class=tokenizer,
                                train_dataset=dataset,
                                args=trl_config(s, config, out, total_steps=2 * n_steps))
        if sorted(trainer.eos_token_ids) != sorted(ours["stop_ids"]):
            raise RuntimeError(f"TRL stops at {trainer.eos_token_ids}, we stop at "
                               f"{ours['stop_ids']}")
        gen, gen_batch, ends, lengths = [], [], [], []
        _timed_method(trainer, "_generate_single_turn", gen,  # -> (completion ids, logprobs)
                      on_result=lambda out: lengths.append([len(c) for c in out[0]]))
        _timed_method(trainer, "_generate_and_score_completions", gen_batch)

        class StepClock(transformers.TrainerCallback):
            def on_train_begin(self, *_, **__):
                ends.append(time.perf_counter())

            def on_step_end(self, *_, **__):
                ends.append(time.perf_counter())

        trainer.add_callback(StepClock())
        trainer.train()
    if len(gen_batch) != n_steps or len(ends) != 2 * n_steps + 1:
        raise RuntimeError(f"TRL ran {len(gen_batch)} generation batches and {len(ends) - 1} "
                           f"optimizer steps; expected {n_steps} and {2 * n_steps}")
    if s.equal_work and any(n != s.max_new_tokens for batch in lengths for n in batch):
        raise RuntimeError(f"equal work: TRL's completions are not all {s.max_new_tokens} tokens")
    rows = []
    for k in range(n_steps):  # one DAPO step = one generation batch + two optimizer steps
        step = ends[2 * k + 2] - ends[2 * k]
        rows.append({"step": step, "gen": gen[k], "old_log_prob": gen_batch[k] - gen[k],
                     "update": step - gen_batch[k]})
    del trainer, model
    gc.collect()
    return {"first": rows[:warmup], "timed": rows[warmup:],
            "completion_mean_length": [float(np.mean(batch)) for batch in lengths]}


# ------------------------------------------------------------------------------------ the table
def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table_row(s: Setting, ours: dict[str, Any], trl: dict[str, Any] | None) -> list[str]:
    """One markdown row: medians of the timed steps, their split, the ratio and the first steps."""
    def split(rows):
        return " / ".join(common.fmt(_median(rows, k)) for k in ("gen", "old_log_prob", "update"))

    def first(rows):
        return " + ".join(common.fmt(r["step"]) for r in rows) or "n/a"

    o = _median(ours["timed"], "step")
    row = [s.label, common.fmt(o), split(ours["timed"])]
    if trl is None:
        return row + ["n/a", "n/a", "n/a", first(ours["first"]), "n/a"]
    t = _median(trl["timed"], "step")
    return row + [common.fmt(t), split(trl["timed"]), f"{t / o:.2f}x", first(ours["first"]),
                  first(trl["first"])]


def load_averages() -> str:
    """`uptime`-style 1, 5 and 15 minute load averages (other jobs share this machine)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every setting on both sides and prints the table; returns the exit status."""
    args = parse_args(argv)
    if not args.skip_trl and not trl_available():
        print(MISSING_TRL, file=sys.stderr)
        return 2
    settings = [Setting(args.preset, args.prompts, args.samples, r, args.equal_work)
                for r in args.max_new_tokens]
    workdir = os.path.join(args.workdir, "smoke" if args.smoke else args.preset)
    print(f"load average before: {load_averages()} on {os.cpu_count()} CPUs; TRL runs with "
          f"{args.torch_threads} torch thread(s)", flush=True)
    results, rows = [], []
    for s in settings:
        config = bench_config(s, tokenizer=args.tokenizer, smoke=args.smoke)
        hf_dir = None if args.skip_trl else os.path.join(workdir, f"hf_start_{s.max_new_tokens}")
        ours = run_ours(s, config, workdir, steps=args.steps, warmup=args.warmup, hf_dir=hf_dir,
                        profile=args.profile)
        trl = None if args.skip_trl else run_trl(s, config, hf_dir, ours, steps=args.steps,
                                                 warmup=args.warmup, threads=args.torch_threads)
        rows.append(table_row(s, ours, trl))
        results.append({"setting": dataclasses.asdict(s),
                        "ours": {k: ours[k] for k in ("first", "timed")},
                        "trl": None if trl is None else trl})
        print(f"done: {s.label} (load average {load_averages()})", flush=True)
    print()
    print(common.markdown_table(COLUMNS, rows))
    print(f"\nMedian of {args.steps} timed steps after {args.warmup} warm-up step(s) "
          "(\"first step\", our compilation included). s/step is wall time of one DAPO step "
          "(generation batch, old log-probs, two optimizer updates); TRL / ours > 1 means ours "
          "is faster. "
          f"Load average after: {load_averages()}.")
    if args.json:
        common.write_json(args.json, {"environment": common.environment(), "args": vars(args),
                                      "columns": COLUMNS, "rows": rows, "results": results,
                                      "load_average_end": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
