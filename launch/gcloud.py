"""Pure builders of `gcloud` command lines (argv lists) for Cloud TPU VMs and queued resources.

Nothing here runs a process: every function returns the argv that `launch.tpu` prints under
`--dry-run` or hands to its runner, so tests compare command lines without gcloud installed.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from launch.errors import LaunchError

# Default TPU software (runtime) version per generation, from Cloud TPU's "TPU software versions"
# page: the images recommended for JAX, on which we install jax[tpu] ourselves.
DEFAULT_RUNTIME_VERSIONS: dict[str, str] = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# How a TPU is paid for. "best-effort" exists only for queued resources (gcloud alpha) and
# "preemptible" only for plain TPU VMs (its successor is "spot").
PROVISIONING_MODELS = ("on-demand", "spot", "preemptible", "reserved", "best-effort")

# Node states (`tpu-vm describe`) and queued-resource states (`queued-resources describe`).
NODE_READY_STATE = "READY"
QUEUED_READY_STATE = "ACTIVE"
NODE_GONE_STATES = frozenset({"PREEMPTED", "TERMINATED"})
# A spot/preemptible queued resource whose node was reclaimed goes SUSPENDING -> SUSPENDED.
QUEUED_GONE_STATES = frozenset({"SUSPENDING", "SUSPENDED", "FAILED"})

_ACCELERATOR_RE = re.compile(r"(?P<gen>[a-z0-9]+)-(?P<size>[0-9]+)")
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_REGION_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+")
_ACCELERATOR_EXAMPLES = "v5p-128, v6e-64, v5litepod-16 or v4-32"


@dataclasses.dataclass(frozen=True)
class Tpu:
    """The TPU a command targets; `queued`: a queued resource whose node has the same name."""

    name: str
    zone: str
    project: str
    queued: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise LaunchError(
                f"--name {self.name!r} is not a valid TPU name: use 1-63 lowercase letters, digits "
                "and hyphens, starting with a letter (e.g. --name=dapo-v5p-128)")
        if not _ZONE_RE.fullmatch(self.zone):
            hint = (f"; {self.zone!r} is a region, pick one of its zones such as {self.zone}-a"
                    if _REGION_RE.fullmatch(self.zone) else "")
            raise LaunchError(
                f"--zone {self.zone!r} is not a zone name like us-east5-a or europe-west4-b{hint}")
        if not self.project or self.project != self.project.strip():
            raise LaunchError(f"--project {self.project!r} is empty or has spaces; pass your "
                              "Google Cloud project id, e.g. --project=my-project")

    @property
    def location_flags(self) -> list[str]:
        """The `--zone`/`--project` flags every gcloud call carries, so none uses gcloud config."""
        return [f"--zone={self.zone}", f"--project={self.project}"]


def parse_accelerator_type(accelerator_type: str) -> tuple[str, int]:
    """Split e.g. "v5p-128" into its generation ("v5p") and size (128); raise on unknown formats."""
    match = _ACCELERATOR_RE.fullmatch(accelerator_type.strip())
    gen = match.group("gen") if match else ""
    if gen == "v5e":
        raise LaunchError(f"--accelerator-type {accelerator_type!r}: Cloud TPU names v5e slices "
                          f"'v5litepod-N'; use --accelerator-type=v5litepod-{match.group('size')}")
    if gen.startswith("tpu7") or gen == "v7":
        raise LaunchError(f"--accelerator-type {accelerator_type!r}: TPU7x (Ironwood) is not "
                          "served by the Cloud TPU API that `gcloud compute tpus` uses; pick one "
                          f"of {', '.join(DEFAULT_RUNTIME_VERSIONS)}")
    if not match or gen not in DEFAULT_RUNTIME_VERSIONS or int(match.group("size")) <= 0:
        raise LaunchError(
            f"unknown --accelerator-type {accelerator_type!r}: expected <generation>-<size> such "
            f"as {_ACCELERATOR_EXAMPLES}; generations: {', '.join(DEFAULT_RUNTIME_VERSIONS)}")
    return gen, int(match.group("size"))


def default_runtime_version(accelerator_type: str) -> str:
    """The recommended TPU software version for the accelerator's generation."""
    generation, _ = parse_accelerator_type(accelerator_type)
    return DEFAULT_RUNTIME_VERSIONS[generation]


def _provisioning_flags(provisioning: str, queued: bool) -> list[str]:
    if provisioning not in PROVISIONING_MODELS:
        raise LaunchError(f"unknown provisioning model {provisioning!r}; choose one of "
                          f"{', '.join(PROVISIONING_MODELS)}")
    if provisioning == "best-effort" and not queued:
        raise LaunchError("--best-effort exists only for queued resources: add --queued, or use "
                          "--spot for a discounted TPU VM")
    if provisioning == "preemptible" and queued:
        raise LaunchError("--preemptible is not offered for queued resources: use --spot "
                          "(its successor) with --queued")
    return [] if provisioning == "on-demand" else [f"--{provisioning}"]


def create_command(tpu: Tpu, accelerator_type: str, runtime_version: str,
                   provisioning: str = "on-demand", extra_flags: Sequence[str] = ()) -> list[str]:
    """`gcloud ... create` for a TPU VM, or for a queued resource (node id = TPU name)."""
    parse_accelerator_type(accelerator_type)
    flags = _provisioning_flags(provisioning, tpu.queued)
    if tpu.queued:
        # --best-effort is still an alpha-track flag of `queued-resources create`.
        track = ["alpha"] if provisioning == "best-effort" else []
        return ["gcloud", *track, "compute", "tpus", "queued-resources", "create", tpu.name,
                *tpu.location_flags, f"--node-id={tpu.name}",
                f"--accelerator-type={accelerator_type}", f"--runtime-version={runtime_version}",
                *flags, *extra_flags]
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", tpu.name, *tpu.location_flags,
            f"--accelerator-type={accelerator_type}", f"--version={runtime_version}",
            *flags, *extra_flags]


def delete_command(tpu: Tpu) -> list[str]:
    """Delete without a prompt; a queued resource is deleted together with its node (--force)."""
    if tpu.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", tpu.name,
                *tpu.location_flags, "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", tpu.name, *tpu.location_flags,
            "--quiet"]


def describe_command(tpu: Tpu, state_only: bool = False) -> list[str]:
    """Describe the TPU (or queued resource); `state_only` prints just its state word."""
    group = "queued-resources" if tpu.queued else "tpu-vm"
    argv = ["gcloud", "compute", "tpus", group, "describe", tpu.name, *tpu.location_flags]
    if state_only:
        argv.append("--format=value(state.state)" if tpu.queued else "--format=value(state)")
    return argv


def ssh_command(tpu: Tpu, remote_command: str, worker: str = "all") -> list[str]:
    """Run a shell command on the given workers ("all", "0", "1,3" ...) of the TPU's node."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu.name, *tpu.location_flags,
            f"--worker={worker}", f"--command={remote_command}"]


def scp_command(tpu: Tpu, local_path: str, remote_path: str, worker: str = "all") -> list[str]:
    """Copy a local file to `remote_path` (relative to the home directory) on the workers."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_path, f"{tpu.name}:{remote_path}",
            *tpu.location_flags, f"--worker={worker}"]
