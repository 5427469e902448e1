"""Tests for the TPU launcher CLI (launch/): exact gcloud command lines, input errors, the
preemption restart loop with a fake runner, and the worker shell scripts run for real in bash."""
from __future__ import annotations

import io
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from launch import pack, remote, tpu

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LOC = "--zone=us-east5-a --project=my-proj"
FLAGS = ["--name", "dapo", "--zone", "us-east5-a", "--project", "my-proj"]
TRAIN = ["--", "--config", "configs/dapo_qwen2_5_32b.py", "--workdir", "gs://bucket/run1"]
PYTHON = shlex.quote(sys.executable)
PACK = f"{PYTHON} -m launch.pack --src . --out /tmp/dapo_jax-src-dapo-sync.tar.gz"
SNAPSHOT = f"{PYTHON} -m launch.pack --src . --out /tmp/dapo_jax-src-dapo-restart.tar.gz"

# The worker scripts, written out by hand: what each worker's shell must receive.
UNPACK = ("mkdir -p dapo_jax && tar -xzf dapo_jax-src.tar.gz -C dapo_jax && "
          "rm -f dapo_jax-src.tar.gz")
APT = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
PIP = ".venv/bin/python -m pip install -q"
INSTALL = (
    "cd dapo_jax && { python3.11 -c 'import ensurepip' 2>/dev/null || { " + APT + " update -q && "
    + APT + " install -y -q python3.11 python3.11-venv; }; } && "
    "{ [ -x .venv/bin/python ] || python3.11 -m venv .venv; } && "
    + PIP + " -U pip && " + PIP + " -r requirements.txt && " + PIP + " --no-deps -e . && "
    + PIP + " -U 'jax[tpu]>=0.10.2,<0.11'")
START = (
    'cd dapo_jax || exit 1; mkdir -p logs; if [ -f logs/train.pid ] && kill -0 '
    '"$(cat logs/train.pid)" 2>/dev/null; then echo "$(hostname): a job is already running '
    '(pid $(cat logs/train.pid)); stop it first" >&2; exit 1; fi; '
    'rm -f logs/train.pid logs/exit_code; '
    'echo "=== start $(date -u +%Y-%m-%dT%H:%M:%SZ) ===" >> logs/train.log; '
    "nohup bash -c 'env PYTHONUNBUFFERED=1 .venv/bin/python -m dapo_jax.train "
    "--config configs/dapo_qwen2_5_32b.py --workdir gs://bucket/run1 & "
    "echo $! > logs/train.pid; wait $!; echo $? > logs/exit_code' "
    '>> logs/train.log 2>&1 < /dev/null & echo "$(hostname): started"')
WAIT = (
    'cd dapo_jax || exit 1; tail -n 20 -F logs/train.log & t=$!; until [ -f logs/exit_code ] || '
    '{ [ -f logs/train.pid ] && ! kill -0 "$(cat logs/train.pid)" 2>/dev/null; }; do sleep 10; '
    'done; sleep 2; kill $t')
JOB_STATUS = (
    'cd dapo_jax 2>/dev/null || { echo "$(hostname): project not set up"; exit 0; }; '
    'if [ -f logs/exit_code ]; then echo "$(hostname): job exited $(cat logs/exit_code)"; '
    'elif [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null; then '
    'echo "$(hostname): job running (pid $(cat logs/train.pid))"; '
    'else echo "$(hostname): no job running"; fi')
STOP_120 = (
    'cd dapo_jax 2>/dev/null && [ -f logs/train.pid ] || exit 0; pid=$(cat logs/train.pid); '
    'kill -TERM "$pid" 2>/dev/null || { echo "$(hostname): no job running"; exit 0; }; '
    'echo "$(hostname): sent SIGTERM to $pid, waiting up to 120 s"; '
    'for i in $(seq 120); do kill -0 "$pid" 2>/dev/null || { echo "$(hostname): stopped"; '
    'exit 0; }; sleep 1; done; kill -KILL "$pid"; echo "$(hostname): killed after 120 s"')


def ssh(script: str, worker: str = "all") -> str:
    return (f"gcloud compute tpus tpu-vm ssh dapo {LOC} --worker={worker} "
            + shlex.quote("--command=" + script))


SCP = ("gcloud compute tpus tpu-vm scp /tmp/dapo_jax-src-dapo-sync.tar.gz dapo:dapo_jax-src.tar.gz "
       f"{LOC} --worker=all")
SCP_SNAPSHOT = SCP.replace("-sync.tar.gz", "-restart.tar.gz")
NODE_STATE = f"gcloud compute tpus tpu-vm describe dapo {LOC} '--format=value(state)'"
QUEUED_STATE = (f"gcloud compute tpus queued-resources describe dapo {LOC} "
                "'--format=value(state.state)'")


@pytest.fixture
def project_dir(tmp_path, monkeypatch) -> pathlib.Path:
    """A working directory that looks like the project root (has requirements.txt)."""
    (tmp_path / "requirements.txt").write_text(
        "# comment\njax[cpu]>=0.10.2,<0.11\nflax>=0.12.8,<0.13\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dry_run(*argv: str, env: dict | None = None) -> list[str]:
    """Stdout lines of the CLI with --dry-run (placed before any training args after --)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    out = io.StringIO()
    code = tpu.main([*argv[:cut], "--dry-run", *argv[cut:]], env=env or {}, runner=_no_runner,
                    out=out)
    assert code == 0
    return out.getvalue().splitlines()


def error_of(argv, capsys, env: dict | None = None) -> str:
    assert tpu.main(argv, env=env or {}, runner=_no_runner, out=io.StringIO()) == 2
    return capsys.readouterr().err


def _no_runner(argv, capture=False):
    raise AssertionError(f"nothing should run, got {argv}")


# ------------------------------------------------------------------ dry-run command lines

def test_create_tpu_vm_spot_prints_the_gcloud_create_line(project_dir):
    assert dry_run("create", *FLAGS, "--accelerator-type", "v5p-128", "--spot") == [
        f"gcloud compute tpus tpu-vm create dapo {LOC} --accelerator-type=v5p-128 "
        "--version=v2-alpha-tpuv5 --spot"]


@pytest.mark.parametrize("flag, expected", [
    ([], ""), (["--preemptible"], " --preemptible"), (["--reserved"], " --reserved")])
def test_create_tpu_vm_maps_each_provisioning_model_to_its_flag(project_dir, flag, expected):
    assert dry_run("create", *FLAGS, "--accelerator-type", "v6e-64", *flag) == [
        f"gcloud compute tpus tpu-vm create dapo {LOC} --accelerator-type=v6e-64 "
        f"--version=v2-alpha-tpuv6e{expected}"]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e"), ("v3-8", "tpu-ubuntu2204-base")])
def test_create_picks_the_documented_runtime_version_per_generation(project_dir, accelerator,
                                                                    runtime):
    (line,) = dry_run("create", *FLAGS, "--accelerator-type", accelerator)
    assert line.endswith(f"--accelerator-type={accelerator} --version={runtime}")


def test_create_runtime_version_and_extra_flags_are_passed_through(project_dir):
    assert dry_run("create", *FLAGS, "--accelerator-type", "v5p-128", "--runtime-version",
                   "v2-alpha-tpuv5-custom", "--create-flag=--network=my-net") == [
        f"gcloud compute tpus tpu-vm create dapo {LOC} --accelerator-type=v5p-128 "
        "--version=v2-alpha-tpuv5-custom --network=my-net"]


def test_create_queued_resource_then_polls_its_state(project_dir):
    assert dry_run("create", *FLAGS, "--queued", "--accelerator-type", "v5p-128", "--spot") == [
        f"gcloud compute tpus queued-resources create dapo {LOC} --node-id=dapo "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot",
        QUEUED_STATE]


def test_create_best_effort_queued_resource_uses_the_alpha_track(project_dir):
    assert dry_run("create", *FLAGS, "--queued", "--accelerator-type", "v6e-64",
                   "--best-effort")[0] == (
        f"gcloud alpha compute tpus queued-resources create dapo {LOC} --node-id=dapo "
        "--accelerator-type=v6e-64 --runtime-version=v2-alpha-tpuv6e --best-effort")


def test_setup_packs_copies_unpacks_and_installs_on_all_workers(project_dir):
    assert dry_run("setup", *FLAGS) == [PACK, SCP, ssh(UNPACK), ssh(INSTALL)]


def test_sync_packs_copies_and_unpacks_without_reinstalling(project_dir):
    assert dry_run("sync", *FLAGS) == [PACK, SCP, ssh(UNPACK)]


def test_run_starts_the_same_command_on_every_worker_in_the_background(project_dir):
    assert dry_run("run", *FLAGS, *TRAIN) == [ssh(START)]


def test_run_with_restart_prints_the_follow_and_recreate_commands(project_dir):
    lines = dry_run("run", *FLAGS, "--accelerator-type", "v5p-128", "--spot",
                    "--restart-on-preemption", "--max-restarts", "3", *TRAIN)
    assert lines == [
        SNAPSHOT, ssh(START), ssh(WAIT, worker="0"), NODE_STATE, ssh(JOB_STATUS, worker="0"),
        "# on preemption (exit code 42, or the TPU is PREEMPTED/TERMINATED), up to 3 times, "
        "after 60 s doubling to at most 1800 s:",
        f"gcloud compute tpus tpu-vm delete dapo {LOC} --quiet",
        f"gcloud compute tpus tpu-vm create dapo {LOC} --accelerator-type=v5p-128 "
        "--version=v2-alpha-tpuv5 --spot",
        SCP_SNAPSHOT, ssh(UNPACK), ssh(INSTALL),
        "# then start and follow the job again as above"]


def test_run_passes_env_and_module_to_the_training_process(project_dir):
    (line,) = dry_run("run", *FLAGS, "--module", "dapo_jax.evaluate", "--env", "A=1 2", *TRAIN)
    script = shlex.split(line)[-1].removeprefix("--command=")
    assert ("nohup bash -c 'env PYTHONUNBUFFERED=1 '\"'\"'A=1 2'\"'\"' .venv/bin/python "
            "-m dapo_jax.evaluate --config") in script


def test_logs_tails_the_chosen_workers_log(project_dir):
    assert dry_run("logs", *FLAGS, "--worker", "3", "--lines", "50", "--follow") == [
        ssh("tail -n 50 -F dapo_jax/logs/train.log", worker="3")]
    assert dry_run("logs", *FLAGS) == [ssh("tail -n 100 dapo_jax/logs/train.log", worker="0")]


def test_status_describes_the_tpu_then_reports_the_job_on_every_worker(project_dir):
    assert dry_run("status", *FLAGS) == [
        f"gcloud compute tpus tpu-vm describe dapo {LOC}", ssh(JOB_STATUS)]
    assert dry_run("status", *FLAGS, "--queued")[0] == (
        f"gcloud compute tpus queued-resources describe dapo {LOC}")


def test_stop_signals_the_job_on_every_worker(project_dir):
    assert dry_run("stop", *FLAGS, "--grace-seconds", "120") == [ssh(STOP_120)]


def test_delete_removes_the_tpu_vm_or_the_queued_resource_with_its_node(project_dir):
    assert dry_run("delete", *FLAGS) == [f"gcloud compute tpus tpu-vm delete dapo {LOC} --quiet"]
    assert dry_run("delete", *FLAGS, "--queued") == [
        f"gcloud compute tpus queued-resources delete dapo {LOC} --force --quiet"]


def test_name_zone_project_and_queued_default_from_the_environment(project_dir):
    env = {"DAPO_TPU_NAME": "dapo", "DAPO_TPU_ZONE": "us-east5-a",
           "CLOUDSDK_CORE_PROJECT": "my-proj", "DAPO_TPU_QUEUED": "1"}
    assert dry_run("delete", env=env) == [
        f"gcloud compute tpus queued-resources delete dapo {LOC} --force --quiet"]
    # A flag wins over its environment variable.
    assert dry_run("delete", "--name", "other", env=env)[0].startswith(
        "gcloud compute tpus queued-resources delete other ")


def test_shell_wrapper_runs_the_cli_from_any_directory(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "tpu.sh"), "delete", *FLAGS, "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"gcloud compute tpus tpu-vm delete dapo {LOC} --quiet\n"


def test_launcher_does_not_import_jax_and_exports_the_preempted_code():
    code = "import sys, launch.tpu as t; print(t.PREEMPTED_EXIT_CODE, 'jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == ["42", "False"]


# ------------------------------------------------------------------ input errors

@pytest.mark.parametrize("drop, flag, fix", [
    ("--name", "--name", "DAPO_TPU_NAME"), ("--zone", "--zone", "DAPO_TPU_ZONE"),
    ("--project", "--project", "CLOUDSDK_CORE_PROJECT")])
def test_missing_target_flag_names_the_flag_and_its_env_var(project_dir, capsys, drop, flag, fix):
    i = FLAGS.index(drop)
    err = error_of(["delete", *FLAGS[:i], *FLAGS[i + 2:]], capsys)
    assert f"missing {flag}: pass {flag}=" in err and fix in err


@pytest.mark.parametrize("accelerator, hint", [
    ("v5p128", "expected <generation>-<size> such as v5p-128"),
    ("v9-8", "generations: v2, v3, v4, v5litepod, v5p, v6e"),
    ("v5e-16", "use --accelerator-type=v5litepod-16"),
    ("tpu7x-64", "TPU7x (Ironwood) is not served by the Cloud TPU API")])
def test_unknown_accelerator_type_is_rejected_with_the_accepted_format(project_dir, capsys,
                                                                       accelerator, hint):
    err = error_of(["create", *FLAGS, "--accelerator-type", accelerator], capsys)
    assert f"--accelerator-type {accelerator!r}" in err and hint in err


def test_missing_accelerator_type_for_create_names_flag_and_env(project_dir, capsys):
    err = error_of(["create", *FLAGS], capsys)
    assert "missing --accelerator-type: pass --accelerator-type=v5p-128" in err
    assert "DAPO_TPU_ACCELERATOR" in err


@pytest.mark.parametrize("argv, message", [
    (["--zone", "us-east5"], "is a region, pick one of its zones such as us-east5-a"),
    (["--name", "Dapo_TPU"], "--name 'Dapo_TPU' is not a valid TPU name"),
    (["--best-effort"], "--best-effort exists only for queued resources: add --queued"),
    (["--queued", "--preemptible"], "--preemptible is not offered for queued resources"),
])
def test_bad_create_input_names_the_flag_and_the_fix(project_dir, capsys, argv, message):
    err = error_of(["create", *FLAGS, "--accelerator-type", "v5p-8", *argv], capsys)
    assert message in err


def test_run_without_training_args_shows_how_to_pass_them(project_dir, capsys):
    assert "run needs the training arguments after --" in error_of(["run", *FLAGS], capsys)


def test_restart_mode_requires_a_gcs_workdir_to_resume_from(project_dir, capsys):
    err = error_of(["run", *FLAGS, "--accelerator-type", "v5p-8", "--restart-on-preemption",
                    "--", "--config", "c.py", "--workdir", "/tmp/run"], capsys)
    assert "--workdir gs://" in err and "'/tmp/run'" in err


@pytest.mark.parametrize("argv, message", [
    (["sync", *FLAGS, "--", "--config", "x"], "sync takes no arguments after --"),
    (["setup", *FLAGS, "--python", "python"], "--python 'python': name a python3.N"),
    (["setup", *FLAGS, "--remote-dir", "~/dapo"], "--remote-dir '~/dapo'"),
    (["run", *FLAGS, "--env", "NOEQUALS", *TRAIN], "--env 'NOEQUALS': expected KEY=VALUE"),
])
def test_other_bad_input_names_the_flag(project_dir, capsys, argv, message):
    assert message in error_of(argv, capsys)


def test_setup_outside_the_project_root_says_to_pass_src(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "--src '.' has no requirements.txt" in error_of(["setup", *FLAGS], capsys)


# ------------------------------------------------------------------ pure helpers

def test_backoff_doubles_from_the_base_up_to_the_cap():
    got = [tpu.backoff_seconds(k, base=60.0, cap=1800.0) for k in range(1, 8)]
    assert got == [60.0, 120.0, 240.0, 480.0, 960.0, 1800.0, 1800.0]


@pytest.mark.parametrize("text, expected", [
    ("jax[cpu]>=0.10.2,<0.11\n", "jax[tpu]>=0.10.2,<0.11"),
    ("jaxlib==0.10.2\nnumpy\n", "jax[tpu]"),
    ("jax >= 0.4.30 ; python_version >= '3.11'  # pinned\n", "jax[tpu]>=0.4.30"),
    ("jax\n", "jax[tpu]"),
])
def test_tpu_jax_requirement_keeps_the_version_bounds_of_requirements(text, expected):
    assert remote.tpu_jax_requirement(text) == expected


def test_the_repository_requirements_pin_jax_tpu_to_the_cpu_jax_bounds():
    text = (REPO_ROOT / "requirements.txt").read_text()
    cpu_line = next(l for l in text.splitlines() if l.startswith("jax[cpu]"))
    assert remote.tpu_jax_requirement(text) == cpu_line.replace("jax[cpu]", "jax[tpu]")


# ------------------------------------------------------------------ restart loop, fake runner

def kind_of(argv) -> str:
    """Name a command by what it does, reading the argv independently of the builders."""
    if "launch.pack" in argv:
        return "pack"
    verb = argv[argv.index("tpus") + 2]
    if verb == "ssh":
        command = next(a for a in argv if a.startswith("--command="))
        for marker, name in [("nohup", "start"), ("tail -n 20 -F", "wait"),
                             ("job exited", "job-status"), ("pip install", "install"),
                             ("tar -xzf", "unpack"), ("kill -TERM", "stop")]:
            if marker in command:
                return name
    if verb == "describe" and any(a.startswith("--format=") for a in argv):
        return "state"
    return verb


class FakeRunner:
    """Answers each kind of command from a script; the last answer of a kind repeats."""

    def __init__(self, **answers):
        self.answers = {k.replace("_", "-"): list(v) for k, v in answers.items()}
        self.calls: list[str] = []

    def __call__(self, argv, capture=False):
        kind = kind_of(list(argv))
        self.calls.append(kind)
        queue = self.answers.get(kind, [])
        answer = queue.pop(0) if len(queue) > 1 else (queue[0] if queue else (0, ""))
        return tpu.CommandResult(*answer)


def run_loop(runner, *extra, queued=False):
    sleeps: list[float] = []
    argv = ["run", *FLAGS, "--accelerator-type", "v5p-128", "--spot", "--restart-on-preemption",
            *(["--queued"] if queued else []), *extra, *TRAIN]
    code = tpu.main(argv, env={}, runner=runner, sleep=sleeps.append, out=io.StringIO())
    return code, sleeps


RECREATE = ["delete", "create", "scp", "unpack", "install"]
FOLLOW = ["start", "wait", "state", "job-status"]
FIRST = ["pack", *FOLLOW]  # the loop snapshots the working tree once, before the first start


def test_preempted_job_is_restarted_on_a_recreated_tpu_and_then_succeeds(project_dir):
    runner = FakeRunner(state=[(0, "READY\n")],
                        job_status=[(0, "w0: job exited 42\n"), (0, "w0: job exited 0\n")])
    code, sleeps = run_loop(runner)
    assert code == 0
    assert runner.calls == FIRST + RECREATE + FOLLOW
    assert sleeps == [60.0]


def test_restarts_stop_at_max_restarts_with_the_preempted_exit_code(project_dir):
    runner = FakeRunner(state=[(0, "READY")], job_status=[(0, "w0: job exited 42")])
    code, sleeps = run_loop(runner, "--max-restarts", "3", "--backoff-seconds", "10")
    assert code == 42
    assert runner.calls == FIRST + (RECREATE + FOLLOW) * 3
    assert sleeps == [10.0, 20.0, 40.0]


def test_a_real_failure_is_not_restarted(project_dir):
    runner = FakeRunner(state=[(0, "READY")], job_status=[(0, "w0: job exited 1")])
    code, sleeps = run_loop(runner)
    assert code == 1
    assert runner.calls == FIRST and sleeps == []


def test_preempted_tpu_state_triggers_a_restart_even_when_ssh_just_fails(project_dir):
    runner = FakeRunner(wait=[(1, ""), (0, "")], state=[(0, "PREEMPTED"), (0, "READY")],
                        job_status=[(0, "w0: job exited 0")])
    code, _ = run_loop(runner)
    assert code == 0
    assert runner.calls == ["pack", "start", "wait", "state"] + RECREATE + FOLLOW


def test_suspended_queued_resource_is_recreated_and_waited_for(project_dir):
    # state answers: SUSPENDED after the first wait, then the create poll, then READY-equivalent.
    runner = FakeRunner(state=[(0, "SUSPENDED"), (0, "WAITING_FOR_RESOURCES"), (0, "ACTIVE")],
                        job_status=[(0, "w0: job exited 0")])
    code, sleeps = run_loop(runner, queued=True)
    assert code == 0
    assert runner.calls == (["pack", "start", "wait", "state", "delete", "create", "state", "state",
                             "scp", "unpack", "install"] + FOLLOW)
    assert sleeps == [60.0, 30.0]  # backoff, then one poll interval before ACTIVE


def test_a_tpu_that_cannot_be_described_is_never_recreated(project_dir):
    runner = FakeRunner(state=[(1, "")])
    code, _ = run_loop(runner)
    assert code == 1
    assert "delete" not in runner.calls and "create" not in runner.calls


def test_failed_recreation_counts_as_a_restart_and_is_retried(project_dir):
    runner = FakeRunner(state=[(0, "READY")], create=[(1, ""), (0, "")],
                        job_status=[(0, "w0: job exited 42"), (0, "w0: job exited 0")])
    code, sleeps = run_loop(runner)
    assert code == 0
    assert runner.calls == FIRST + ["delete", "create"] + RECREATE + FOLLOW
    assert sleeps == [60.0, 120.0]


def test_lost_log_stream_reattaches_without_restarting(project_dir):
    runner = FakeRunner(state=[(0, "READY")],
                        job_status=[(0, "w0: job running (pid 7)"), (0, "w0: job exited 0")])
    code, _ = run_loop(runner)
    assert code == 0
    assert runner.calls == FIRST + ["wait", "state", "job-status"]


def test_a_job_gone_without_exit_code_is_restarted_on_the_same_tpu(project_dir):
    runner = FakeRunner(state=[(0, "READY")],
                        job_status=[(0, "w0: no job running"), (0, "w0: job exited 0")])
    code, sleeps = run_loop(runner)
    assert code == 0
    assert runner.calls == FIRST + FOLLOW and sleeps == [60.0]


def test_restart_loop_stops_before_starting_when_packing_fails(project_dir):
    runner = FakeRunner(pack=[(1, "")])
    assert run_loop(runner)[0] == 1 and runner.calls == ["pack"]


def test_create_queued_resource_polls_until_active(project_dir):
    runner = FakeRunner(state=[(0, "ACCEPTED"), (0, "PROVISIONING"), (0, "ACTIVE")])
    sleeps: list[float] = []
    argv = ["create", *FLAGS, "--queued", "--accelerator-type", "v5p-8"]
    assert tpu.main(argv, env={}, runner=runner, sleep=sleeps.append) == 0
    assert runner.calls == ["create", "state", "state", "state"] and sleeps == [30.0, 30.0]


def test_create_queued_resource_gives_up_when_it_fails(project_dir):
    runner = FakeRunner(state=[(0, "FAILED")])
    argv = ["create", *FLAGS, "--queued", "--accelerator-type", "v5p-8"]
    assert tpu.main(argv, env={}, runner=runner, sleep=lambda s: None) == 1


# ------------------------------------------------------------------ worker scripts in bash

FAKE_TRAINER = """\
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))  # checkpoint-and-exit stand-in
if sys.argv[1] == "exit":
    print("training done")
    sys.exit(int(sys.argv[2]))
print("training", flush=True)
time.sleep(60)
"""


def _bash(script: str, home: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=home, capture_output=True, text=True,
                          timeout=60)


needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None,
    reason="needs bash on PATH (install it, e.g. `apt-get install bash`): the worker scripts are bash")
needs_git = pytest.mark.skipif(
    shutil.which("git") is None,
    reason="needs git on PATH (install it, e.g. `apt-get install git`): pack lists files with "
           "`git ls-files`")


@pytest.fixture
def worker_home(tmp_path) -> pathlib.Path:
    """A fake worker home: dapo_jax/ with a venv python that runs this interpreter."""
    project = tmp_path / "dapo_jax"
    (project / ".venv" / "bin").mkdir(parents=True)
    python = project / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (project / "fake_train.py").write_text(FAKE_TRAINER)
    yield tmp_path
    pid_file = project / remote.PID_FILE
    if pid_file.exists():  # never leave the fake trainer behind
        subprocess.run(["kill", "-KILL", pid_file.read_text().strip()], capture_output=True)


@needs_bash
def test_worker_scripts_record_exit_codes_refuse_a_second_job_and_stop_with_sigterm(worker_home):
    status = remote.job_status_script("dapo_jax")
    assert remote.parse_job_status(_bash(status, worker_home).stdout) == ("none", None)

    started = _bash(remote.start_script("dapo_jax", "fake_train", ["exit", "3"]), worker_home)
    assert started.returncode == 0 and "started" in started.stdout
    waited = _bash(remote.wait_script("dapo_jax", poll_seconds=1), worker_home)
    assert "training done" in waited.stdout
    assert remote.parse_job_status(_bash(status, worker_home).stdout) == ("exited", 3)

    sleeper = remote.start_script("dapo_jax", "fake_train", ["sleep"])
    assert _bash(sleeper, worker_home).returncode == 0
    log = worker_home / "dapo_jax" / remote.LOG_FILE
    # Deadlines here are hang guards (the failure is "never", not "slow"), as generous as _bash's.
    deadline = time.monotonic() + 60
    while not log.read_text().endswith("training\n"):  # its SIGTERM handler is installed
        assert time.monotonic() < deadline, "the fake trainer never started"
        time.sleep(0.1)
    assert remote.parse_job_status(_bash(status, worker_home).stdout)[0] == "running"
    second = _bash(sleeper, worker_home)
    assert second.returncode == 1 and "already running" in second.stderr

    stopped = _bash(remote.stop_script("dapo_jax", grace_seconds=20), worker_home)
    assert "stopped" in stopped.stdout
    deadline = time.monotonic() + 60
    while remote.parse_job_status(_bash(status, worker_home).stdout)[0] != "exited":
        assert time.monotonic() < deadline, "the wrapper never recorded the exit code"
        time.sleep(0.2)
    assert remote.parse_job_status(_bash(status, worker_home).stdout) == ("exited", 42)


@needs_bash
def test_unpack_overwrites_the_code_but_keeps_the_workers_venv(tmp_path, worker_home):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("x = 1\n")
    pack.write_tarball(src, worker_home / remote.TARBALL_NAME)
    result = _bash(remote.unpack_script("dapo_jax"), worker_home)
    assert result.returncode == 0, result.stderr
    assert (worker_home / "dapo_jax" / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert (worker_home / "dapo_jax" / ".venv" / "bin" / "python").exists()
    assert not (worker_home / remote.TARBALL_NAME).exists()


def test_every_worker_script_is_valid_bash():
    scripts = [remote.unpack_script("dapo_jax"),
               remote.install_script("dapo_jax", "python3.11", "jax[tpu]>=0.10.2,<0.11"),
               remote.start_script("dapo_jax", "m", ["--a", "it's"], ["K=v w"]),
               remote.wait_script("dapo_jax"), remote.job_status_script("dapo_jax"),
               remote.stop_script("dapo_jax", 5), remote.logs_script("my dir", 10, True)]
    for script in scripts:
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script


# ------------------------------------------------------------------ packing the working tree

def _members(tarball: pathlib.Path) -> set[str]:
    with tarfile.open(tarball) as tar:
        return set(tar.getnames())


def _tree(root: pathlib.Path) -> None:
    for rel in ["a.py", "sub/b.py", "ignored.txt", ".venv/bin/python", "workdir/ckpt/0",
                "sub/__pycache__/b.pyc"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / ".gitignore").write_text("ignored.txt\n")


@needs_git
def test_pack_ships_git_visible_files_and_never_venv_or_workdir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    _tree(src)
    out = tmp_path / "out.tar.gz"
    assert pack.main(["--src", str(src), "--out", str(out)]) == 0
    assert _members(out) == {".gitignore", "a.py", "sub/b.py"}


def test_pack_outside_git_walks_the_tree_skipping_known_folders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    out = src / "out.tar.gz"  # inside the tree: must not pack itself
    assert pack.write_tarball(src, out) == 4
    assert _members(out) == {".gitignore", "a.py", "sub/b.py", "ignored.txt"}
