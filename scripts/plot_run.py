"""Plots a training run's curves (held-out accuracy, rollout accuracy, response length, entropy).

    python scripts/plot_run.py --workdir /tmp/arith --out docs/arith_curves.png \
        --title "Qwen2.5-Coder-0.5B-Instruct, DAPO on arithmetic"

Reads `<workdir>/metrics` (what `python -m dapo_jax.train` writes) and prints the validations and
the seconds per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dapo_jax.demo import _acc_key, plot_curves  # noqa: E402
from dapo_jax.training.metrics_writer import read_metrics  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the run's workdir (holds metrics/)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--dataset", default="toy", help="validation set whose mean@k is plotted")
    p.add_argument("--title", default="DAPO training run")
    args = p.parse_args(argv)
    metrics = read_metrics(args.workdir)
    if not metrics:
        p.error(f"no metrics under {os.path.join(args.workdir, 'metrics')}: is --workdir a "
                "training run's workdir?")
    key = _acc_key(metrics, args.dataset)
    for m in metrics:
        if key and key in m:
            print(f"step {m['step']:3d}: {key} = {m[key]:.4f}")
    times = [m["timing_s/step"] for m in metrics if "timing_s/step" in m]
    if times:
        print(f"{len(times)} training steps, seconds per step: median {statistics.median(times):.1f}, "
              f"min {min(times):.1f}, max {max(times):.1f}")
    plot_curves(metrics, args.out, dataset=args.dataset, title=args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
