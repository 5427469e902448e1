"""Run DAPO training on a Cloud TPU VM slice: create, setup, sync, run, logs, status, stop, delete.

    python -m launch.tpu create --name dapo --zone us-east5-a --accelerator-type v5p-128 --spot
    python -m launch.tpu setup  --name dapo --zone us-east5-a
    python -m launch.tpu run    --name dapo --zone us-east5-a -- \\
        --config configs/dapo_qwen2_5_32b.py --workdir gs://my-bucket/dapo-32b

Every worker of the slice runs the same command (JAX multi-controller SPMD). `--dry-run` prints
the gcloud command lines instead of running them. `run --restart-on-preemption` stays in the
foreground and, when the TPU is preempted, recreates it, reinstalls, and starts the same command
again, which resumes from the latest checkpoint in its workdir. Defaults for --name, --zone,
--project and --accelerator-type come from DAPO_TPU_NAME, DAPO_TPU_ZONE (or
CLOUDSDK_COMPUTE_ZONE), DAPO_TPU_PROJECT (or CLOUDSDK_CORE_PROJECT) and DAPO_TPU_ACCELERATOR.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Mapping, NamedTuple, Protocol, Sequence, TextIO

from dapo_jax.training.preemption import PREEMPTED_EXIT_CODE
from launch import gcloud, remote
from launch.errors import LaunchError


DEFAULT_PYTHON = "python3.11"
DEFAULT_REMOTE_DIR = "dapo_jax"
DEFAULT_MODULE = "dapo_jax.train"
STATE_POLL_SECONDS = 30.0
_PYTHON_RE = re.compile(r"python3\.[0-9]+")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
_TRUE = frozenset({"1", "true", "yes", "on"})


class CommandResult(NamedTuple):
    """What a runner reports: the exit status, and stdout when it was captured."""

    returncode: int
    stdout: str = ""


class Runner(Protocol):
    """Runs one argv; with `capture` returns its stdout instead of streaming it to the terminal."""

    def __call__(self, argv: Sequence[str], capture: bool = False) -> CommandResult: ...


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a plan: run once, or (with `poll_until`) re-run until it prints a state."""

    argv: tuple[str, ...]
    may_fail: bool = False
    poll_until: frozenset[str] = frozenset()
    poll_abort: frozenset[str] = frozenset()
    poll_seconds: float = STATE_POLL_SECONDS


@dataclasses.dataclass(frozen=True)
class Machine:
    """How to (re)create the TPU."""

    accelerator_type: str
    runtime_version: str
    provisioning: str = "on-demand"
    extra_flags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Code:
    """What to copy to the workers and how to install it there."""

    src: str
    remote_dir: str = DEFAULT_REMOTE_DIR
    python: str = DEFAULT_PYTHON
    jax_requirement: str = "jax[tpu]"


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """Limits of `run --restart-on-preemption`."""

    max_restarts: int = 10
    backoff_seconds: float = 60.0
    max_backoff_seconds: float = 1800.0
    # Losing the log stream while the TPU looks healthy: re-attach this many times in a row.
    max_reattach: int = 10
    reattach_seconds: float = 60.0


@dataclasses.dataclass(frozen=True)
class JobSteps:
    """Everything the restart loop runs, built up front by the pure plan functions."""

    snapshot: Step
    start: Step
    wait: Step
    state: Step
    job_status: Step
    recreate: tuple[Step, ...]
    gone_states: frozenset[str]


def _step(argv: Sequence[str], **kwargs) -> Step:
    return Step(tuple(argv), **kwargs)


# ----------------------------------------------------------------------------- plans (pure)

def create_plan(tpu: gcloud.Tpu, machine: Machine) -> list[Step]:
    """Create the TPU; a queued resource is then polled until its node is ACTIVE."""
    steps = [_step(gcloud.create_command(tpu, machine.accelerator_type, machine.runtime_version,
                                         machine.provisioning, machine.extra_flags))]
    if tpu.queued:
        steps.append(_step(gcloud.describe_command(tpu, state_only=True),
                           poll_until=frozenset({gcloud.QUEUED_READY_STATE}),
                           poll_abort=gcloud.QUEUED_GONE_STATES))
    return steps


def local_tarball(tpu: gcloud.Tpu, purpose: str = "sync") -> str:
    """Where the packed working tree is written before it is copied (one file per TPU and use)."""
    return f"/tmp/dapo_jax-src-{tpu.name}-{purpose}.tar.gz"


def pack_step(code: Code, tarball: str) -> Step:
    """Pack the local working tree into `tarball` (git-visible files, no venv or workdir)."""
    return _step([sys.executable, "-m", "launch.pack", "--src", code.src, "--out", tarball])


def _copy_steps(tpu: gcloud.Tpu, code: Code, tarball: str, install: bool) -> list[Step]:
    steps = [_step(gcloud.scp_command(tpu, tarball, remote.TARBALL_NAME)),
             _step(gcloud.ssh_command(tpu, remote.unpack_script(code.remote_dir)))]
    if install:
        script = remote.install_script(code.remote_dir, code.python, code.jax_requirement)
        steps.append(_step(gcloud.ssh_command(tpu, script)))
    return steps


def sync_plan(tpu: gcloud.Tpu, code: Code) -> list[Step]:
    """Pack the working tree, copy it to every worker, and unpack it over `remote_dir`."""
    tarball = local_tarball(tpu)
    return [pack_step(code, tarball), *_copy_steps(tpu, code, tarball, install=False)]


def setup_plan(tpu: gcloud.Tpu, code: Code) -> list[Step]:
    """Sync the code, then build each worker's venv with the project and jax[tpu]."""
    tarball = local_tarball(tpu)
    return [pack_step(code, tarball), *_copy_steps(tpu, code, tarball, install=True)]


def start_step(tpu: gcloud.Tpu, remote_dir: str, module: str, train_args: Sequence[str],
               env: Sequence[str] = ()) -> Step:
    """Start the same training command in the background on every worker."""
    return _step(gcloud.ssh_command(tpu, remote.start_script(remote_dir, module, train_args, env)))


def status_plan(tpu: gcloud.Tpu, remote_dir: str) -> list[Step]:
    """Describe the TPU (or queued resource), then report the job on every worker."""
    return [_step(gcloud.describe_command(tpu)),
            _step(gcloud.ssh_command(tpu, remote.job_status_script(remote_dir)))]


def job_steps(tpu: gcloud.Tpu, machine: Machine, code: Code, module: str,
              train_args: Sequence[str], env: Sequence[str] = ()) -> JobSteps:
    """The commands of `run --restart-on-preemption`; worker 0 speaks for the job.

    The working tree is packed once when the loop starts and every recreated TPU gets that
    snapshot, so a resumed run uses the code it started with even if the tree is edited.
    """
    tarball = local_tarball(tpu, "restart")
    recreate = (_step(gcloud.delete_command(tpu), may_fail=True),  # it may already be gone
                *create_plan(tpu, machine), *_copy_steps(tpu, code, tarball, install=True))
    return JobSteps(
        snapshot=pack_step(code, tarball),
        start=start_step(tpu, code.remote_dir, module, train_args, env),
        wait=_step(gcloud.ssh_command(tpu, remote.wait_script(code.remote_dir), worker="0")),
        state=_step(gcloud.describe_command(tpu, state_only=True)),
        job_status=_step(gcloud.ssh_command(tpu, remote.job_status_script(code.remote_dir),
                                            worker="0")),
        recreate=recreate,
        gone_states=gcloud.QUEUED_GONE_STATES if tpu.queued else gcloud.NODE_GONE_STATES,
    )


def backoff_seconds(restart: int, base: float, cap: float) -> float:
    """Wait before the `restart`-th recreation (1-based): base, 2*base, 4*base ... at most cap."""
    return min(cap, base * 2.0 ** (restart - 1))


# ----------------------------------------------------------------------------- execution

def _log(message: str) -> None:
    print(f"[launch.tpu] {message}", file=sys.stderr, flush=True)


def subprocess_runner(argv: Sequence[str], capture: bool = False) -> CommandResult:
    """Run argv for real; output goes to the terminal unless captured."""
    try:
        proc = subprocess.run(list(argv), stdout=subprocess.PIPE if capture else None, text=True)
    except FileNotFoundError as error:
        raise LaunchError(f"{argv[0]} was not found: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install) and run "
                          "`gcloud auth login`") from error
    return CommandResult(proc.returncode, proc.stdout or "")


def _poll(step: Step, runner: Runner, sleep: Callable[[float], None],
          log: Callable[[str], None]) -> int:
    last, failures = "", 0
    while True:
        result = runner(step.argv, capture=True)
        state = result.stdout.strip() if result.returncode == 0 else ""
        if state in step.poll_until:
            return 0
        if state in step.poll_abort:
            log(f"state is {state}; giving up (see `status` for the reason)")
            return 1
        failures = 0 if state else failures + 1
        if failures >= 5:
            return result.returncode or 1
        if state != last:
            log(f"state {state or 'unknown'}; waiting for {'/'.join(sorted(step.poll_until))} "
                f"(checking every {step.poll_seconds:.0f} s)")
            last = state
        sleep(step.poll_seconds)


def execute(steps: Sequence[Step], runner: Runner, sleep: Callable[[float], None] = time.sleep,
            log: Callable[[str], None] = _log) -> int:
    """Run the steps in order; stop at the first failure that is not allowed, returning its code."""
    for step in steps:
        if step.poll_until:
            code = _poll(step, runner, sleep, log)
        else:
            log("+ " + shlex.join(step.argv))
            code = runner(step.argv).returncode
        if code != 0 and not step.may_fail:
            return code
    return 0


def _query_state(job: JobSteps, runner: Runner, sleep: Callable[[float], None],
                 attempts: int = 3) -> str | None:
    """The TPU's state word, or None when describe keeps failing (deleted by someone, or auth)."""
    for attempt in range(attempts):
        result = runner(job.state.argv, capture=True)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
        if attempt + 1 < attempts:
            sleep(10.0)
    return None


def _attempt(job: JobSteps, policy: RestartPolicy, runner: Runner,
             sleep: Callable[[float], None], log: Callable[[str], None]) -> tuple[str, int]:
    """Start the job and follow it to an outcome: succeeded, failed, preempted or vanished."""
    log("+ " + shlex.join(job.start.argv))
    code = runner(job.start.argv).returncode
    state = _query_state(job, runner, sleep) if code != 0 else ""
    if state in job.gone_states:
        log(f"the TPU is {state}")
        return "preempted", code
    if code != 0:
        log(f"starting the job failed (exit {code}) with the TPU {state or 'not describable'}")
        return "failed", code
    unreachable = 0
    while True:
        runner(job.wait.argv)  # streams worker 0's log; returns when the job ends or ssh drops
        state = _query_state(job, runner, sleep)
        if state is None:
            # Never recreate what we cannot see: it may have been deleted on purpose.
            log("cannot describe the TPU (deleted? `gcloud auth login`?); stopping")
            return "failed", 1
        if state in job.gone_states:
            log(f"the TPU is {state}")
            return "preempted", PREEMPTED_EXIT_CODE
        result = runner(job.job_status.argv, capture=True)
        status, exit_code = remote.parse_job_status(result.stdout)
        if status == "exited" and exit_code == 0:
            return "succeeded", 0
        if status == "exited" and exit_code == PREEMPTED_EXIT_CODE:
            log(f"the job exited with {PREEMPTED_EXIT_CODE} (checkpointed after SIGTERM)")
            return "preempted", PREEMPTED_EXIT_CODE
        if status == "exited":
            return "failed", exit_code
        if status == "running":
            unreachable = 0  # only the log stream dropped; the job is fine
            log("the log stream ended but the job still runs; re-attaching")
            sleep(10.0)
            continue
        if status == "none":
            log("the job on worker 0 is gone without an exit code (worker restarted?)")
            return "vanished", 1
        unreachable += 1
        if unreachable > policy.max_reattach:
            log(f"worker 0 unreachable {unreachable} times in a row with the TPU {state}")
            return "failed", 1
        log(f"lost contact with worker 0 (TPU {state}); re-attaching in "
            f"{policy.reattach_seconds:.0f} s")
        sleep(policy.reattach_seconds)


def run_with_restarts(job: JobSteps, policy: RestartPolicy, runner: Runner,
                      sleep: Callable[[float], None] = time.sleep,
                      log: Callable[[str], None] = _log) -> int:
    """Run the job until it succeeds or really fails, recreating the TPU after each preemption.

    Returns 0 on success, the job's exit code on a real failure, and PREEMPTED_EXIT_CODE when
    preemptions outnumber `policy.max_restarts`.
    """
    if execute([job.snapshot], runner, sleep, log) != 0:
        log("packing the working tree failed")
        return 1
    restarts = 0
    while True:
        outcome, code = _attempt(job, policy, runner, sleep, log)
        if outcome == "succeeded":
            log("the job finished successfully")
            return 0
        if outcome == "failed":
            log(f"the job failed with exit code {code}; not restarting (see `logs`)")
            return code
        while True:
            if restarts >= policy.max_restarts:
                log(f"{outcome} after {restarts} restarts: giving up (raise --max-restarts)")
                return PREEMPTED_EXIT_CODE
            restarts += 1
            delay = backoff_seconds(restarts, policy.backoff_seconds, policy.max_backoff_seconds)
            action = "restarting the job" if outcome == "vanished" else "recreating the TPU"
            log(f"{outcome}: {action} ({restarts}/{policy.max_restarts}) in {delay:.0f} s")
            sleep(delay)
            if outcome == "vanished" or execute(job.recreate, runner, sleep, log) == 0:
                break
            log("recreating the TPU failed")


# ----------------------------------------------------------------------------- CLI

def _common_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("TPU")
    group.add_argument("--name", help="TPU (and queued resource) name [env DAPO_TPU_NAME]")
    group.add_argument("--zone", help="zone, e.g. us-east5-a [env DAPO_TPU_ZONE, "
                                      "CLOUDSDK_COMPUTE_ZONE]")
    group.add_argument("--project", help="Google Cloud project id [env DAPO_TPU_PROJECT, "
                                         "CLOUDSDK_CORE_PROJECT]")
    group.add_argument("--queued", action="store_true",
                       help="the TPU is a queued resource [env DAPO_TPU_QUEUED=1]")
    group.add_argument("--dry-run", action="store_true",
                       help="print the gcloud command lines instead of running them")
    return parser


def _machine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("machine")
    group.add_argument("--accelerator-type",
                       help="e.g. v5p-128, v6e-64, v5litepod-16, v4-32 [env DAPO_TPU_ACCELERATOR]")
    group.add_argument("--runtime-version", help="TPU software version (default per generation: "
                       + ", ".join(f"{k}: {v}" for k, v in
                                   gcloud.DEFAULT_RUNTIME_VERSIONS.items()) + ")")
    models = group.add_mutually_exclusive_group()
    for model in gcloud.PROVISIONING_MODELS[1:]:
        models.add_argument(f"--{model}", dest="provisioning", action="store_const",
                            const=model, help=f"provision as {model} (default: on-demand)")
    group.add_argument("--create-flag", action="append", default=[], metavar="FLAG",
                       help="extra flag for gcloud create, e.g. --create-flag=--network=my-net")
    parser.set_defaults(provisioning="on-demand")
    return parser


def _code_parser(install: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("code")
    group.add_argument("--src", default=".", help="local project folder to copy (default: .)")
    group.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR,
                       help="project folder on each worker, relative to home "
                            "(default: %(default)s)")
    if install:
        group.add_argument("--python", default=DEFAULT_PYTHON,
                           help="python3.N interpreter for the workers' venv "
                                "(default: %(default)s)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The `python -m launch.tpu` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    common, machine = _common_parser(), _machine_parser()

    sub.add_parser("create", parents=[common, machine], help="create the TPU VM / queued resource")
    sub.add_parser("setup", parents=[common, _code_parser(install=True)],
                   help="copy the project to every worker and install it in a venv")
    sub.add_parser("sync", parents=[common, _code_parser(install=False)],
                   help="copy the working tree to every worker again")
    run = sub.add_parser(
        "run", parents=[common, machine, _code_parser(install=True)],
        help="start the training command on every worker (training args after --)",
        description="Start `python -m MODULE <args after -->` on every worker. The machine "
                    "flags, --src and --python are used only by --restart-on-preemption, to "
                    "recreate the TPU and reinstall.")
    run.add_argument("--module", default=DEFAULT_MODULE,
                     help="module to run (default: %(default)s)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable for the training process (repeatable)")
    run.add_argument("--restart-on-preemption", action="store_true",
                     help="stay in the foreground; recreate the TPU and restart after preemption")
    run.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts)
    run.add_argument("--backoff-seconds", type=float, default=RestartPolicy.backoff_seconds,
                     help="wait before the first recreation, doubled each time (max 30 min)")
    logs = sub.add_parser("logs", parents=[common], help="print (or follow) a worker's log")
    logs.add_argument("--worker", type=int, default=0, help="worker index (default: 0)")
    logs.add_argument("--lines", type=int, default=100, help="lines to print (default: 100)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR)
    status = sub.add_parser("status", parents=[common],
                            help="describe the TPU and show whether the job runs on each worker")
    status.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR)
    stop = sub.add_parser("stop", parents=[common], help="stop the job on every worker "
                          "(SIGTERM: the trainer checkpoints, then SIGKILL after a grace period)")
    stop.add_argument("--grace-seconds", type=int, default=300,
                      help="how long to wait for the checkpoint before SIGKILL (default: 300)")
    stop.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR)
    sub.add_parser("delete", parents=[common], help="delete the TPU VM / queued resource")
    return parser


def _require(value: str | None, flag: str, example: str, env_vars: Sequence[str]) -> str:
    if value:
        return value
    env_hint = " or set " + " / ".join(env_vars) if env_vars else ""
    raise LaunchError(f"missing {flag}: pass {flag}={example}{env_hint}")


def resolve_tpu(args: argparse.Namespace, env: Mapping[str, str]) -> gcloud.Tpu:
    """The target TPU from flags, falling back to environment variables."""
    name = _require(args.name or env.get("DAPO_TPU_NAME"), "--name", "dapo-v5p-128",
                    ["DAPO_TPU_NAME"])
    zone = _require(args.zone or env.get("DAPO_TPU_ZONE") or env.get("CLOUDSDK_COMPUTE_ZONE"),
                    "--zone", "us-east5-a", ["DAPO_TPU_ZONE"])
    project = _require(args.project or env.get("DAPO_TPU_PROJECT")
                       or env.get("CLOUDSDK_CORE_PROJECT"), "--project", "my-project",
                       ["CLOUDSDK_CORE_PROJECT"])
    queued = args.queued or env.get("DAPO_TPU_QUEUED", "").strip().lower() in _TRUE
    return gcloud.Tpu(name=name, zone=zone, project=project, queued=queued)


def resolve_machine(args: argparse.Namespace, env: Mapping[str, str]) -> Machine:
    """Accelerator type, runtime version and provisioning model from flags and env."""
    accelerator = _require(args.accelerator_type or env.get("DAPO_TPU_ACCELERATOR"),
                           "--accelerator-type", "v5p-128", ["DAPO_TPU_ACCELERATOR"])
    runtime = args.runtime_version or gcloud.default_runtime_version(accelerator)
    return Machine(accelerator, runtime, args.provisioning, tuple(args.create_flag))


def resolve_code(args: argparse.Namespace) -> Code:
    """Check the local project folder and derive the jax[tpu] pin from its requirements.txt."""
    requirements = pathlib.Path(args.src, "requirements.txt")
    if not requirements.is_file():
        raise LaunchError(f"--src {args.src!r} has no requirements.txt: run from the project "
                          "root or pass --src=/path/to/dapo_jax")
    if args.remote_dir.startswith("~") or not args.remote_dir.strip():
        raise LaunchError(f"--remote-dir {args.remote_dir!r}: give a path relative to the "
                          "workers' home folder (e.g. --remote-dir=dapo_jax) or an absolute one")
    python = getattr(args, "python", DEFAULT_PYTHON)
    if not _PYTHON_RE.fullmatch(python):
        raise LaunchError(f"--python {python!r}: name a python3.N interpreter, e.g. "
                          "--python=python3.11 (installed with apt when missing)")
    return Code(src=args.src, remote_dir=args.remote_dir, python=python,
                jax_requirement=remote.tpu_jax_requirement(requirements.read_text()))


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _check_train_args(train_args: Sequence[str], restart: bool) -> None:
    if not train_args:
        raise LaunchError("run needs the training arguments after --, e.g. run --name dapo "
                          "--zone us-east5-a -- --config configs/dapo_qwen2_5_32b.py "
                          "--workdir gs://my-bucket/dapo-32b")
    workdir = _flag_value(train_args, "--workdir")
    if workdir is not None and workdir.startswith("gs://"):
        return
    problem = ("has no --workdir" if workdir is None else
               f"has --workdir {workdir!r}, which each worker would keep on its own disk")
    if restart:
        raise LaunchError(f"run --restart-on-preemption: the training command {problem}; "
                          "resuming after a preemption needs a shared checkpoint folder that "
                          "outlives the TPU, e.g. --workdir gs://my-bucket/dapo-32b")
    if workdir is not None:
        _log(f"warning: the training command {problem}; multi-host checkpoints need a gs:// "
             "workdir, and local files are lost when the TPU is deleted")


def _print_plan(steps: Sequence[Step], out: TextIO) -> None:
    for step in steps:
        print(shlex.join(step.argv), file=out)


def _print_job(job: JobSteps, policy: RestartPolicy, out: TextIO) -> None:
    _print_plan([job.snapshot, job.start, job.wait, job.state, job.job_status], out)
    print(f"# on preemption (exit code {PREEMPTED_EXIT_CODE}, or the TPU is "
          f"{'/'.join(sorted(job.gone_states))}), up to {policy.max_restarts} times, "
          f"after {policy.backoff_seconds:.0f} s doubling to at most "
          f"{policy.max_backoff_seconds:.0f} s:", file=out)
    _print_plan(job.recreate, out)
    print("# then start and follow the job again as above", file=out)


def _dispatch(args: argparse.Namespace, train_args: Sequence[str], env: Mapping[str, str],
              runner: Runner, sleep: Callable[[float], None], out: TextIO) -> int:
    tpu = resolve_tpu(args, env)
    if args.command == "create":
        steps = create_plan(tpu, resolve_machine(args, env))
    elif args.command == "setup":
        steps = setup_plan(tpu, resolve_code(args))
    elif args.command == "sync":
        steps = sync_plan(tpu, resolve_code(args))
    elif args.command == "logs":
        steps = [_step(gcloud.ssh_command(
            tpu, remote.logs_script(args.remote_dir, args.lines, args.follow), str(args.worker)))]
    elif args.command == "status":
        steps = status_plan(tpu, args.remote_dir)
    elif args.command == "stop":
        steps = [_step(gcloud.ssh_command(tpu, remote.stop_script(args.remote_dir,
                                                                   args.grace_seconds)))]
    elif args.command == "delete":
        steps = [_step(gcloud.delete_command(tpu))]
    else:
        return _dispatch_run(args, tpu, train_args, env, runner, sleep, out)
    if args.dry_run:
        _print_plan(steps, out)
        return 0
    return execute(steps, runner, sleep)


def _dispatch_run(args: argparse.Namespace, tpu: gcloud.Tpu, train_args: Sequence[str],
                  env: Mapping[str, str], runner: Runner, sleep: Callable[[float], None],
                  out: TextIO) -> int:
    _check_train_args(train_args, args.restart_on_preemption)
    for item in args.env:
        if not _ENV_RE.fullmatch(item):
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE, e.g. --env=JAX_LOG_LEVEL=info")
    if not args.restart_on_preemption:
        step = start_step(tpu, args.remote_dir, args.module, train_args, args.env)
        if args.dry_run:
            _print_plan([step], out)
            return 0
        code = execute([step], runner, sleep)
        if code == 0:
            where = f"--name={tpu.name} --zone={tpu.zone} --project={tpu.project}"
            _log(f"started; follow it with: python -m launch.tpu logs {where} --follow")
        return code
    if args.max_restarts < 0 or args.backoff_seconds < 0:
        raise LaunchError("--max-restarts and --backoff-seconds must be >= 0")
    policy = RestartPolicy(max_restarts=args.max_restarts, backoff_seconds=args.backoff_seconds)
    job = job_steps(tpu, resolve_machine(args, env), resolve_code(args), args.module,
                    train_args, args.env)
    if args.dry_run:
        _print_job(job, policy, out)
        return 0
    return run_with_restarts(job, policy, runner, sleep)


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         runner: Runner = subprocess_runner, sleep: Callable[[float], None] = time.sleep,
         out: TextIO | None = None) -> int:
    """CLI entry point; `env`, `runner`, `sleep` and `out` are injectable for tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    try:
        if train_args and args.command != "run":
            raise LaunchError(f"{args.command} takes no arguments after --; only run passes "
                              "them to the training command")
        return _dispatch(args, train_args, env, runner, sleep, out)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _log("interrupted; a job already started keeps running on the TPU (see `stop`)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
