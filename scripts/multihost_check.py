"""Multi-process check: a 2-process CPU run of the toy DAPO trainer logs the metrics of a 1-process run.

    python scripts/multihost_check.py [--steps 2] [--warm-start-steps 2] [--mesh 1,4,2]
                                      [--preempt --steps 3] [--workdir DIR] [--keep]

Runs `dapo_jax.train` twice on localhost CPU with the same 8-device mesh (default data=1, fsdp=4,
tensor=2): once as one process with 8 fake devices, once as 2 processes x 4 fake devices joined by
`jax.distributed` (coordinator on 127.0.0.1). Arrays of the second run span both processes, so host
reads, jit inputs, the SFT warm start and its cache, checkpoints, validation, the HF export and
logging all take their multi-host paths. Prints each metric side by side; exits non-zero if a
metric or an exported weight differs by more than the tolerance (a fraction of the
values' size, never a fixed absolute amount), or a run fails.

`--preempt` also sends SIGTERM to process 1 alone after step 1 (a preemption notice reaching one
host first): both processes must then stop after the same step with exit code 42 and one
checkpoint, and the 2-process restart must finish with the single-process metrics.

A deterministic stand-in reward (`byte_parity_reward`) replaces math_dapo: an untrained toy policy
never answers correctly, so the real reward gives all-wrong groups, zero advantages and zero
gradients, which would hide any difference in the update. It reaches `python -m dapo_jax.train` as
`--config.reward.fn=scripts.multihost_check:byte_parity_reward` (nothing else changes).

The helpers (`toy_overrides`, `launch`, `compare_metrics`...) are shared with tests/test_multihost.py
and tests/test_preemption.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any, Mapping, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run by path: import this checkout's packages, not an install
    sys.path.insert(0, str(REPO_ROOT))

# Metrics that measure wall-clock time, not the computation.
TIMING_PREFIXES = ("timing_s/", "perf/")

# The toy config shrunk to seconds per step, on a mesh that spans every device (1 x 4 x 2 on 8).
TINY_TOY = {
    "data.toy.num_train": 64,
    "data.toy.num_heldout": 8,
    "data.toy.max_digits": 1,
    "data.max_response_length": 12,
    "algo.overlong_buffer.len": 4,
    "algo.overlong_filter": False,  # the barely trained policy rarely stops within 12 tokens
    "algo.dynamic_sampling.max_num_gen_batches": 3,
    "algo.dynamic_sampling.on_cap": "proceed",
    "rollout.n": 4,
    "rollout.max_concurrent_decodes": 16,
    "warm_start.steps": 0,
    "warm_start.batch_size": 8,
    "trainer.train_batch_size": 2,
    "trainer.gen_batch_size": 3,  # > train_batch_size: surplus groups are carried over
    "trainer.mini_batch_size": 8,
    "trainer.micro_batch_size": 4,  # a multiple of the data-parallel size fsdp = 4
    "trainer.total_steps": 2,
    "trainer.save_every": 1,
    "trainer.test_freq": 0,
    "trainer.val_before_train": False,
    "mesh.num_devices": 0,
    "mesh.data": 1,
    "mesh.fsdp": -1,
    "mesh.tensor": 2,
}


def toy_overrides(changes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TINY_TOY with `changes` (dotted config paths -> values) applied on top."""
    return {**TINY_TOY, **(changes or {})}


def make_config(overrides: Mapping[str, Any]):
    """configs/toy.py with dotted-path overrides applied (what `--config.a.b=v` flags do)."""
    from configs import toy
    c = toy.get_config()
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        if last not in node:
            raise KeyError(f"config has no field {key!r}")
        node[last] = value
    return c


def config_flags(overrides: Mapping[str, Any]) -> list[str]:
    """The `--config.a.b=v` command-line flags for `overrides`."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def byte_parity_reward(responses: Sequence[str], truths: Sequence[str], **kwargs) -> list[dict]:
    """Stand-in for score_batch: correct iff the CRC32 of the response text is even (mixed groups)."""
    del truths, kwargs
    out = []
    for text in responses:
        acc = zlib.crc32(text.encode()) % 2 == 0
        out.append({"score": 1.0 if acc else -1.0, "acc": acc, "pred": text[-8:]})
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(num_devices: int, compilation_cache_dir: str | None = None) -> dict[str, str]:
    """Environment for a CPU trainer process with `num_devices` fake devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    if compilation_cache_dir:
        # Identical programs of earlier runs load from disk instead of compiling. Only process 0
        # of a multi-process run writes entries, under keys that include its own devices, so the
        # other processes still compile (and jax_share_binary_between_hosts, which looks up
        # process 0's binary under the receiver's key, would wait forever).
        env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def train_command(workdir: str | os.PathLike, overrides: Mapping[str, Any], *,
                  stand_in_reward: bool = True, process_id: int | None = None,
                  num_processes: int = 1, port: int | None = None) -> list[str]:
    """The command line of one `python -m dapo_jax.train` process (with the stand-in reward)."""
    if stand_in_reward:
        overrides = {**overrides, "reward.fn": "scripts.multihost_check:byte_parity_reward"}
    cmd = [sys.executable, "-m", "dapo_jax.train", "--config", "configs/toy.py", "--workdir",
           os.fspath(workdir), "--noprogress", *config_flags(overrides)]
    if num_processes > 1:
        cmd += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
                "--process_id", str(process_id)]
    return cmd


@dataclasses.dataclass
class Run:
    """One finished (or killed) launch: exit codes and log files, process 0 first."""

    returncodes: list[int | None]
    logs: list[pathlib.Path]
    timed_out: bool

    def log_tail(self, chars: int = 3000) -> str:
        """The end of every process's log, for failure messages."""
        parts = []
        for i, path in enumerate(self.logs):
            text = path.read_text(errors="replace") if path.exists() else ""
            lines = [ln for ln in text.splitlines() if not ln.startswith(("I1", "I0", "[Gloo]"))]
            parts.append(f"--- process {i} (exit {self.returncodes[i]}) {path}:\n"
                         + "\n".join(lines)[-chars:])
        return "\n".join(parts)


def start(workdir: str | os.PathLike, overrides: Mapping[str, Any], *, num_processes: int = 1,
          devices_per_process: int = 8, stand_in_reward: bool = True,
          compilation_cache_dir: str | None = None,
          log_dir: str | os.PathLike | None = None) -> tuple[list[subprocess.Popen], list[pathlib.Path]]:
    """Starts the trainer processes of one run (not waiting); logs go to <log_dir>/process_<i>.log."""
    log_dir = pathlib.Path(log_dir or workdir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port() if num_processes > 1 else None
    env = subprocess_env(devices_per_process, compilation_cache_dir)
    procs, logs = [], []
    for i in range(num_processes):
        log = log_dir / f"process_{i}.log"
        cmd = train_command(workdir, overrides, stand_in_reward=stand_in_reward, process_id=i,
                            num_processes=num_processes, port=port)
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def wait(procs: Sequence[subprocess.Popen], logs: Sequence[pathlib.Path], timeout: float,
         grace: float = 20.0) -> Run:
    """Waits for every process; kills the rest when one fails (they would hang in a collective)."""
    deadline = time.monotonic() + timeout
    timed_out = False
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed:
            deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            timed_out = not failed
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return Run([p.returncode for p in procs], list(logs), timed_out)


def launch(workdir: str | os.PathLike, overrides: Mapping[str, Any], *, num_processes: int = 1,
           devices_per_process: int = 8, timeout: float = 600.0, stand_in_reward: bool = True,
           compilation_cache_dir: str | None = None,
           log_dir: str | os.PathLike | None = None) -> Run:
    """Runs one training job of `num_processes` processes to completion (or `timeout` seconds)."""
    procs, logs = start(workdir, overrides, num_processes=num_processes,
                        devices_per_process=devices_per_process, stand_in_reward=stand_in_reward,
                        compilation_cache_dir=compilation_cache_dir, log_dir=log_dir)
    return wait(procs, logs, timeout)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The per-step records of <workdir>/metrics/ in step order (empty when absent)."""
    from dapo_jax.training.metrics_writer import read_metrics as read
    return read(workdir)


def last_logged_step(workdir: str | os.PathLike) -> int:
    """The highest step logged in <workdir>/metrics/ so far (0 if none); safe while it is written
    (each step's object appears whole, by rename)."""
    path = pathlib.Path(workdir) / "metrics"
    if not path.exists():
        return 0
    steps = [int(p.name[5:-6]) for p in path.glob("step_*.jsonl")]
    return max(steps, default=0)


def comparable(record: Mapping[str, float]) -> dict[str, float]:
    """A metrics record without its wall-clock entries (timing_s/, perf/, throughputs)."""
    return {k: v for k, v in record.items()
            if not (k.startswith(TIMING_PREFIXES) or "/timing_s/" in k or k.endswith("tokens_per_s"))}


def _term_scale(record: Mapping[str, float], key: str) -> float:
    """Size of the float32 terms a metric is a small difference of (0 for other metrics).

    Round-off in such a metric is relative to its terms, not to its value: the KL between two
    copies of one policy is +-3e-8 around 0, the noise of log-probs of size ~entropy.
    """
    if key in ("actor/pg_loss", "actor/loss"):  # sums of advantage x ratio terms
        return max(abs(record.get("critic/advantages/max", 0.0)),
                   abs(record.get("critic/advantages/min", 0.0)))
    if key == "actor/ppo_kl":  # differences of log-probs; their mean size is the entropy
        return abs(record.get("actor/entropy", 0.0))
    if key.startswith("training/rollout_probs_diff"):  # differences of probabilities
        return 1.0
    return 0.0


def compare_metrics(expected: Sequence[Mapping[str, float]], actual: Sequence[Mapping[str, float]],
                    *, rtol: float = 1e-5) -> list[str]:
    """Every difference between two metric logs beyond rtol times the values' size (empty = equal).

    The size is max(|a|, |b|), or the size of the terms for metrics that are small differences of
    larger terms (`_term_scale`): no fixed absolute tolerance, which would pass any value of a
    metric that is itself far smaller than it.
    """
    problems = []
    if len(expected) != len(actual):
        problems.append(f"{len(expected)} records vs {len(actual)}")
    for e, a in zip(expected, actual):
        e, a = comparable(e), comparable(a)
        step = e.get("step")
        if e.keys() != a.keys():
            problems.append(f"step {step}: keys differ: only in the first "
                            f"{sorted(e.keys() - a.keys())}, only in the second "
                            f"{sorted(a.keys() - e.keys())}")
        for k in sorted(e.keys() & a.keys()):
            size = max(abs(e[k]), abs(a[k]), _term_scale(e, k))
            if not abs(e[k] - a[k]) <= rtol * size:
                problems.append(f"step {step}: {k}: {e[k]!r} vs {a[k]!r} (|difference| "
                                f"{abs(e[k] - a[k]):.3g} > {rtol:g} x size {size:.3g})")
    return problems


def tree_differences(expected: Any, actual: Any, *, rtol: float, start: Any = None) -> list[str]:
    """Leaves of two pytrees (dicts of arrays) that differ by more than rtol times their size.

    Per leaf: max |expected - actual| <= rtol * max |expected|, or, given `start` (the values
    both runs began from), rtol times the largest change the expected run made from it: weights
    move by ~lr per step from a much larger initialisation, and a difference in the updates is
    measured against the updates.
    """
    import jax
    import numpy as np

    want, want_def = jax.tree_util.tree_flatten_with_path(expected)
    have, have_def = jax.tree.flatten(actual)
    if want_def != have_def:
        return [f"tree structures differ:\n  {want_def}\n  {have_def}"]
    starts = jax.tree.leaves(start) if start is not None else [None] * len(want)
    problems = []
    for (path, w), h, s0 in zip(want, have, starts):
        name = jax.tree_util.keystr(path)
        w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
        if w.shape != h.shape:
            problems.append(f"{name}: shape {w.shape} vs {h.shape}")
            continue
        if not w.size:
            continue
        size = np.max(np.abs(w if s0 is None else w - np.asarray(s0, np.float64)))
        diff = np.max(np.abs(w - h))
        if not diff <= rtol * size:
            what = "largest change from the start" if s0 is not None else "largest |value|"
            problems.append(f"{name}: max |difference| {diff:.3g} > {rtol:g} x {what} {size:.3g}")
    return problems


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete orbax checkpoints in <workdir>/checkpoints."""
    root = pathlib.Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _table(single: Sequence[Mapping], multi: Sequence[Mapping]) -> str:
    lines = ["| step | metric | 1 process x 8 devices | 2 processes x 4 devices |",
             "|---|---|---|---|"]
    for s, m in zip(single, multi):
        s, m = comparable(s), comparable(m)
        for k in sorted(s.keys() | m.keys()):
            if k != "step":
                lines.append(f"| {s.get('step')} | {k} | {s.get(k)!r} | {m.get(k)!r} |")
    return "\n".join(lines)


def compare_exports(a: pathlib.Path, b: pathlib.Path, *, rtol: float) -> list[str]:
    """Differences between the tensors of two exported HF checkpoint directories (tree_differences)."""
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if ta.keys() != tb.keys():
        return [f"exported tensor names differ: {sorted(ta.keys() ^ tb.keys())}"]
    return [f"exported {p}" for p in tree_differences(ta, tb, rtol=rtol)]


def _preempted_multi_run(workdir: pathlib.Path, overrides: Mapping[str, Any], args) -> list[str]:
    """2-process run, SIGTERM to process 1 alone after step 1, then a restart to the end."""
    # A horizon it cannot reach before the signal lands; no periodic checkpoints, so the only one
    # is the one the SIGTERM forces.
    horizon = {**overrides, "trainer.total_steps": 999, "trainer.save_every": 1000}
    procs, logs = start(workdir, horizon, num_processes=2, devices_per_process=4,
                        compilation_cache_dir=args.compilation_cache_dir,
                        log_dir=workdir / "preempted_logs")
    deadline = time.monotonic() + args.timeout
    while (time.monotonic() < deadline and all(p.poll() is None for p in procs)
           and last_logged_step(workdir) < 1):
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice that reaches one host first
    run = wait(procs, logs, timeout=min(args.timeout, 300.0))
    steps = [r["step"] for r in read_metrics(workdir)]
    print(f"multi, SIGTERM to process 1 after step 1: exit codes {run.returncodes}, logged steps "
          f"{steps}, checkpoints {checkpoint_steps(workdir)}", flush=True)
    if run.timed_out or run.returncodes != [42, 42]:
        return [f"preempted 2-process run: exit codes {run.returncodes} (timed out: "
                f"{run.timed_out}); both processes must stop after the same step with exit code "
                f"42\n{run.log_tail()}"]
    if not steps or checkpoint_steps(workdir) != [steps[-1]] or steps[-1] >= args.steps:
        return [f"preempted 2-process run: logged steps {steps}, checkpoints "
                f"{checkpoint_steps(workdir)}; expected one checkpoint at the last logged step, "
                f"before step {args.steps}"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the 1-process and the 2-process toy runs and compares their metrics and exports."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="training steps of each run")
    ap.add_argument("--warm-start-steps", type=int, default=2,
                    help="SFT warm-start steps (exercises the warm-start cache; 0 skips it)")
    ap.add_argument("--mesh", default="1,4,2",
                    help="data,fsdp,tensor sizes over the 8 devices (one may be -1)")
    ap.add_argument("--preempt", action="store_true",
                    help="SIGTERM process 1 alone after step 1: both processes must stop after the "
                         "same step with exit code 42; the 2-process restart must then finish "
                         "with the single-process metrics (needs --steps >= 3)")
    ap.add_argument("--workdir", default=None, help="where the runs write (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--rtol", type=float, default=1e-5,
                    help="metrics may differ by this fraction of their size (compare_metrics)")
    # Seen on CPU: 8e-5 on k_proj.bias (tiny gradients, which Adam turns into full-size steps
    # that carry their round-off), 2e-5 on the largest weights; a broken reduction is O(1).
    ap.add_argument("--weights-rtol", type=float, default=1e-3,
                    help="exported weights may differ by this fraction of each tensor's largest "
                         "|value| (tree_differences)")
    ap.add_argument("--compilation-cache-dir", default=None,
                    help="persistent XLA cache shared by the runs (default: none)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir of a temp-dir run")
    args = ap.parse_args(argv)
    if args.steps < (3 if args.preempt else 1):
        ap.error("--steps must be >= 1 (>= 3 with --preempt)")
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))

    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="dapo_multihost_"))
    overrides = toy_overrides({
        "trainer.total_steps": args.steps, "warm_start.steps": args.warm_start_steps,
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
        # validation at the last step and an HF export at the end: their multi-host paths too
        "trainer.test_freq": args.steps, "eval.n": 2, "eval.max_problems": 4,
        "trainer.export_hf_on_finish": True})
    problems = []
    for name, procs, devices in (("single", 1, 8), ("multi", 2, 4)):
        workdir = root / name
        if workdir.exists():
            shutil.rmtree(workdir)
        if name == "multi" and args.preempt:
            problems += _preempted_multi_run(workdir, overrides, args)
            if problems:
                break
        t0 = time.time()
        run = launch(workdir, overrides, num_processes=procs, devices_per_process=devices,
                     timeout=args.timeout, compilation_cache_dir=args.compilation_cache_dir)
        print(f"{name}: {procs} process(es) x {devices} devices, exit codes {run.returncodes}, "
              f"{time.time() - t0:.0f}s", flush=True)
        if run.timed_out or any(rc != 0 for rc in run.returncodes):
            problems.append(f"{name} run failed\n{run.log_tail()}")
            break
    if not problems:
        single, multi = read_metrics(root / "single"), read_metrics(root / "multi")
        print(_table(single, multi))
        problems += compare_metrics(single, multi, rtol=args.rtol)
        if [r["step"] for r in single] != list(range(1, args.steps + 1)):
            problems.append(f"single-process run logged steps {[r['step'] for r in single]}")
        if not any(k.startswith("val-core/") for k in single[-1]):
            problems.append("no validation metrics at the last step")
        for name in ("single", "multi"):
            if checkpoint_steps(root / name)[-1:] != [args.steps]:
                problems.append(f"{name}: checkpoints {checkpoint_steps(root / name)}, expected "
                                f"the last at step {args.steps}")
        if args.warm_start_steps and not (root / "multi" / "warm_start" / "config.json").exists():
            problems.append("multi: no warm-start cache written")
        for name in ("single", "multi"):
            reports = root / name / "eval" / f"step_{args.steps:06d}" / "toy"
            if not (reports / "report.json").exists():
                problems.append(f"{name}: no validation report in {reports}")
        export = pathlib.Path("hf_export") / f"step_{args.steps}"
        problems += compare_exports(root / "single" / export, root / "multi" / export,
                                    rtol=args.weights_rtol)
    if not args.workdir and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if problems:
        print("MISMATCH:\n  " + "\n  ".join(problems))
        return 1
    print(f"OK: {args.steps} steps, {len(comparable(single[0])) - 1} metrics each, and the exported "
          f"weights, equal within {args.rtol:g} (metrics) and {args.weights_rtol:g} (weights) of "
          f"their size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
