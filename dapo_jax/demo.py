"""`make demo`: a tiny Qwen2 policy learns toy arithmetic with DAPO on CPU, in minutes.

Runs `configs/toy.py` (supervised warm start cached in the workdir, then DAPO with the real `math_dapo`
reward and dynamic sampling), then plots held-out accuracy, response length and entropy per step to
`<workdir>/curves.png` and prints a summary. Re-running resumes (or just re-reports) the same workdir.

Config overrides work as in training: `python -m dapo_jax.demo --config.trainer.total_steps=5`, or
`make demo ARGS="--config.trainer.total_steps=5"`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from dapo_jax.runtime.cli_errors import VERBOSE_HELP, parse_flags, run_cli

# The demo is tuned for CPU; respect an explicit choice (e.g. JAX_PLATFORMS=cuda) if given.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def plot_curves(metrics: list[dict], path: str, dataset: str = "toy", eval_note: str = "",
                rollout_note: str = "",
                title: str = "DAPO on toy arithmetic (configs/toy.py)") -> None:
    """Held-out accuracy, response length and entropy vs step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key = _acc_key(metrics, dataset)
    val = [(m["step"], m[acc_key]) for m in metrics if acc_key and acc_key in m]
    train = [m for m in metrics if "response_length/mean" in m]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if val:
        axes[0].plot(*zip(*val), "o-", label=f"held-out {acc_key.split('/')[-1]}{eval_note}")
    if train:
        rollout = [(m["step"], m["train/acc_before_filter"]) for m in train
                   if "train/acc_before_filter" in m]
        if rollout:
            axes[0].plot(*zip(*rollout), alpha=0.6, label=f"rollout accuracy{rollout_note}")
        axes[1].plot([m["step"] for m in train], [m["response_length/mean"] for m in train])
        axes[2].plot([m["step"] for m in train], [m.get("actor/entropy", 0.0) for m in train])
    axes[0].set(title="accuracy", xlabel="step", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    axes[1].set(title="mean response length (tokens)", xlabel="step")
    axes[2].set(title="policy entropy (nats/token)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heldout_summary(metrics: list[dict], dataset: str = "toy"
                    ) -> tuple[str, tuple[int, float], tuple[int, float]] | None:
    """(metric key, (first step, accuracy), (last step, accuracy)) of the validations, if two or more."""
    key = _acc_key(metrics, dataset)
    val = [(m["step"], m[key]) for m in metrics if key and key in m]
    return (key, val[0], val[-1]) if len(val) >= 2 else None


def _acc_key(metrics: list[dict], dataset: str) -> str | None:
    for m in metrics:
        for k in m:
            if k.startswith(f"val-core/{dataset}/acc/mean@"):
                return k
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="workdir/demo")
    parser.add_argument("--config", default="configs/toy.py", help="config file (default toy)")
    parser.add_argument("--steps", type=int, default=None, help="override trainer.total_steps")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    parser.epilog = "--config.a.b=value overrides a config field, as in python -m dapo_jax.train."
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config fields are set with "
                     "--config.a.b=value)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import jax

    from dapo_jax.config_validation import validate_config
    from dapo_jax.training.metrics_writer import read_metrics
    from dapo_jax.training.run_record import tee_console
    from dapo_jax.training.trainer import Trainer, prepare_workdir

    config = _load_config(args.config, rest)
    if args.steps:
        config.trainer.total_steps = args.steps
    validate_config(config, jax.device_count())  # fail fast, before any file is written
    prepare_workdir(args.workdir)
    tee_console(args.workdir)
    from dapo_jax.runtime import compile_cache
    compile_cache.enable(config.trainer.get("compilation_cache_dir", compile_cache.AUTO),
                         args.workdir)
    cache_use = compile_cache.counter()
    t0 = time.time()
    print(f"DAPO demo: {args.config} -> {args.workdir} (JAX on {os.environ['JAX_PLATFORMS']})",
          flush=True)
    trainer = Trainer(config, args.workdir)
    trainer.train()
    trainer.close()
    if jax.config.jax_compilation_cache_dir:
        print(compile_cache.summary(cache_use()), flush=True)
    metrics = read_metrics(args.workdir)
    png = os.path.join(args.workdir, "curves.png")
    plot_curves(metrics, png,
                eval_note=f" (T={config.eval.temperature:g}, top-p {config.eval.top_p:g})",
                rollout_note=f" (T={config.rollout.temperature:g}, top-p {config.rollout.top_p:g})")
    summary = heldout_summary(metrics, "toy")
    minutes = (time.time() - t0) / 60
    if summary is not None:
        key, (s0, a0), (s1, a1) = summary
        best_step, best = max(((m["step"], m[key]) for m in metrics if key in m),
                              key=lambda x: x[1])
        print(f"DAPO demo: held-out accuracy ({key.split('/')[-1]}) {a0:.3f} at step {s0} -> "
              f"{a1:.3f} at step {s1} ({100 * (a1 - a0):+.1f} points; best {best:.3f} at step "
              f"{best_step}) in {minutes:.1f} min; "
              f"curves in {png}; metrics in {os.path.join(args.workdir, 'metrics')}/")
    else:
        print(f"DAPO demo finished in {minutes:.1f} min; curves in {png}")
    return 0


def _load_config(path: str, overrides: list[str] | tuple[str, ...] = ()):
    """Loads `file.py[:arg]` and applies `--config.a.b=v` overrides exactly as `--config` does."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["demo", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, "Experiment config file.",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    parse_flags(argv, flag_values)
    return flag_values.config


if __name__ == "__main__":
    sys.exit(run_cli(main))  # user errors: `error: ...` and exit status 2, no traceback
