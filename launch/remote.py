"""Pure builders of the shell scripts the launcher runs on every TPU worker over ssh.

Each worker keeps the project in `<remote_dir>` (relative to its home directory) with its own
`.venv`, and one job at a time whose files live in `<remote_dir>/logs/` on that worker's disk:
`train.log` (appended across runs), `train.pid` (the Python process) and `exit_code` (written
when the process ends). The scripts are single lines for `gcloud ... ssh --command`, which
hands them to the worker's login shell (bash on TPU VM images).
"""
from __future__ import annotations

import re
import shlex
from typing import Sequence

TARBALL_NAME = "dapo_jax-src.tar.gz"
LOG_FILE = "logs/train.log"
PID_FILE = "logs/train.pid"
EXIT_CODE_FILE = "logs/exit_code"
VENV_PYTHON = ".venv/bin/python"

_EXITED_RE = re.compile(r"job exited (-?[0-9]+)")
_JAX_LINE_RE = re.compile(r"jax(\[[^\]]*\])?\s*(?P<spec>[<>=!~].*)?")
_JOB_ALIVE = f'[ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null'


def unpack_script(remote_dir: str, tarball: str = TARBALL_NAME) -> str:
    """Extract the copied source tarball over `remote_dir`, keeping its .venv and logs."""
    d, t = shlex.quote(remote_dir), shlex.quote(tarball)
    return f"mkdir -p {d} && tar -xzf {t} -C {d} && rm -f {t}"


def tpu_jax_requirement(requirements_text: str) -> str:
    """The `jax[tpu]` requirement with the same version bounds as requirements.txt's jax line."""
    for line in requirements_text.splitlines():
        requirement = line.split("#")[0].split(";")[0].strip()  # drop comments and markers
        match = _JAX_LINE_RE.fullmatch(requirement)
        if match:
            return "jax[tpu]" + (match.group("spec") or "").replace(" ", "")
    return "jax[tpu]"


def install_script(remote_dir: str, python: str, jax_requirement: str) -> str:
    """Make the worker's venv with `python` (apt-installed if missing) and install the project.

    Requirements first, then jax[tpu] with the same bounds: it adds libtpu next to the jax
    that requirements.txt pinned (installed there with the CPU extra).
    """
    d, py = shlex.quote(remote_dir), shlex.quote(python)
    apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
    pip = f"{VENV_PYTHON} -m pip install -q"
    steps = [
        f"cd {d}",
        # TPU VM images ship an older python3; ensurepip also proves the venv module is there.
        f"{{ {py} -c 'import ensurepip' 2>/dev/null || {{ {apt} update -q && "
        f"{apt} install -y -q {py} {shlex.quote(python + '-venv')}; }}; }}",
        f"{{ [ -x {VENV_PYTHON} ] || {py} -m venv .venv; }}",
        f"{pip} -U pip",
        f"{pip} -r requirements.txt",
        f"{pip} --no-deps -e .",
        f"{pip} -U {shlex.quote(jax_requirement)}",
    ]
    return " && ".join(steps)


def start_script(remote_dir: str, module: str, train_args: Sequence[str],
                 env: Sequence[str] = ()) -> str:
    """Start `python -m module train_args...` in the background (nohup), refusing a second job.

    The wrapper records the Python pid (so `stop` signals Python itself, letting the trainer
    checkpoint on SIGTERM) and the exit code (so a later ssh can tell success, preemption and
    failure apart after the launching session is gone).
    """
    python_cmd = shlex.join(["env", "PYTHONUNBUFFERED=1", *env, VENV_PYTHON, "-m", module,
                             *train_args])
    wrapper = (f"{python_cmd} & echo $! > {PID_FILE}; wait $!; "
               f"echo $? > {EXIT_CODE_FILE}")
    return (
        f"cd {shlex.quote(remote_dir)} || exit 1; mkdir -p logs; "
        f"if {_JOB_ALIVE}; then echo \"$(hostname): a job is already running "
        f"(pid $(cat {PID_FILE})); stop it first\" >&2; exit 1; fi; "
        f"rm -f {PID_FILE} {EXIT_CODE_FILE}; "
        f"echo \"=== start $(date -u +%Y-%m-%dT%H:%M:%SZ) ===\" >> {LOG_FILE}; "
        f"nohup bash -c {shlex.quote(wrapper)} >> {LOG_FILE} 2>&1 < /dev/null & "
        f"echo \"$(hostname): started\""
    )


def wait_script(remote_dir: str, poll_seconds: int = 10, tail_lines: int = 20) -> str:
    """Stream the worker's log until its job has ended (exit code written or process gone)."""
    ended = (f"[ -f {EXIT_CODE_FILE} ] || {{ [ -f {PID_FILE} ] && "
             f"! kill -0 \"$(cat {PID_FILE})\" 2>/dev/null; }}")
    return (
        f"cd {shlex.quote(remote_dir)} || exit 1; "
        f"tail -n {tail_lines} -F {LOG_FILE} & t=$!; "
        f"until {ended}; do sleep {poll_seconds}; done; "
        # The wrapper writes exit_code just after the process ends: let the file land.
        f"sleep 2; kill $t"
    )


def job_status_script(remote_dir: str) -> str:
    """Print one line per worker: job running, exited with a code, or none."""
    return (
        f"cd {shlex.quote(remote_dir)} 2>/dev/null || "
        f"{{ echo \"$(hostname): project not set up\"; exit 0; }}; "
        f"if [ -f {EXIT_CODE_FILE} ]; then "
        f"echo \"$(hostname): job exited $(cat {EXIT_CODE_FILE})\"; "
        f"elif {_JOB_ALIVE}; then echo \"$(hostname): job running (pid $(cat {PID_FILE}))\"; "
        f"else echo \"$(hostname): no job running\"; fi"
    )


def parse_job_status(status_output: str) -> tuple[str, int | None]:
    """Read `job_status_script` output of one worker: ("exited", code), ("running", None),
    ("none", None) when no job runs, or ("unknown", None) when the output says nothing."""
    match = _EXITED_RE.search(status_output)
    if match:
        return "exited", int(match.group(1))
    if "no job running" in status_output or "project not set up" in status_output:
        return "none", None
    if "job running" in status_output:
        return "running", None
    return "unknown", None


def stop_script(remote_dir: str, grace_seconds: int) -> str:
    """SIGTERM the job (the trainer checkpoints and exits), SIGKILL it after `grace_seconds`."""
    return (
        f"cd {shlex.quote(remote_dir)} 2>/dev/null && [ -f {PID_FILE} ] || exit 0; "
        f"pid=$(cat {PID_FILE}); "
        f"kill -TERM \"$pid\" 2>/dev/null || {{ echo \"$(hostname): no job running\"; exit 0; }}; "
        f"echo \"$(hostname): sent SIGTERM to $pid, waiting up to {grace_seconds} s\"; "
        f"for i in $(seq {grace_seconds}); do kill -0 \"$pid\" 2>/dev/null || "
        f"{{ echo \"$(hostname): stopped\"; exit 0; }}; sleep 1; done; "
        f"kill -KILL \"$pid\"; echo \"$(hostname): killed after {grace_seconds} s\""
    )


def logs_script(remote_dir: str, lines: int, follow: bool) -> str:
    """Print the last `lines` lines of the worker's log, following it with `follow`."""
    follow_flag = " -F" if follow else ""
    return f"tail -n {lines}{follow_flag} {shlex.quote(remote_dir)}/{LOG_FILE}"
