"""Lowering the trainer's and sampler's programs for TPUs and GPUs this machine does not have.

JAX traces a program for the platform of its context mesh's abstract device and lowers it for any
platform (`Traced.lower(lowering_platforms=...)`); Pallas lowers its TPU (Mosaic) and GPU (Triton)
kernels in Python. So a CPU can build the StableHLO a TPU slice or a GPU host would compile, with
the kernels the model picks there (splash attention and the ragged paged decode kernel on TPU,
Pallas flash attention on GPU), and catch what would fail on the hardware (a kernel that rejects a
shape, a sharding that does not divide) before a job is submitted. What lowering does not cover:
the accelerator's own compiler (XLA:TPU / XLA:GPU buffer assignment, Mosaic and Triton code
generation).

For TPUs the compiler is available too: with libtpu installed, `tpu_topology_devices` gives the
devices of a whole slice (no TPU needed), and jit compiles for them with XLA:TPU ahead of time
("deviceless" compilation): real per-device memory and real kernel compilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import time
from typing import Callable, Iterator, Mapping

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from dapo_jax.models.sharding import MESH_AXES
from dapo_jax.runtime.cli_errors import UserError
from dapo_jax.runtime.topology import Topology, chip_grid

# The libtpu that jax[tpu] pins for the jax in requirements.txt (jax 0.10.x).
LIBTPU_REQUIREMENT = "libtpu==0.0.42.*"

# The custom-call target each platform's Pallas kernels lower to.
KERNEL_TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
_KERNEL_NAME = {"tpu": re.compile(r'kernel_name = "([^"]+)"'),
                "cuda": re.compile(r', name = "([\w.]+)", num_stages')}


@dataclasses.dataclass(frozen=True)
class LoweredProgram:
    """One program lowered for an accelerator: the Pallas kernels it calls, or why it failed."""

    name: str
    platform: str  # the lowering platform: "tpu" or "cuda"
    seconds: float
    kernels: tuple[str, ...] = ()  # distinct Pallas kernel names, sorted
    kernel_calls: int = 0  # custom calls to them in the module (a scanned layer counts once)
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the program lowered."""
        return not self.error


def lowering_platform(platform: str) -> str:
    """The name `lowering_platforms` takes for a device platform ("gpu" lowers as "cuda")."""
    platform = platform.lower()
    return "cuda" if platform == "gpu" else platform


def abstract_mesh(sizes: Mapping[str, int], device_kind: str, platform: str,
                  num_cores: int | None = None) -> AbstractMesh:
    """A ('data', 'fsdp', 'tensor') mesh of `sizes` over abstract `device_kind` devices, with
    `models.sharding.make_mesh`'s axis types (Auto: shardings named at jit boundaries)."""
    return AbstractMesh(tuple(int(sizes[a]) for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES),
                        abstract_device=AbstractDevice(device_kind, num_cores, platform))


@contextlib.contextmanager
def _ragged_kernel_generation(device_kind: str) -> Iterator[None]:
    """jax's ragged paged attention kernel picks its block sizes from the TPU generation, which
    it reads from `jax.devices()` rather than the abstract mesh: answer from `device_kind`."""
    try:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as tb
    except ImportError:  # a jax without the kernel: the model never picks it
        yield
        return
    kind = device_kind.removesuffix(" lite")
    version = int(kind[-1]) if kind.startswith("TPU v") and kind[-1].isdigit() else -1
    saved = tb.get_tpu_version, tb.get_device_name
    tb.get_tpu_version = lambda: version
    tb.get_device_name = lambda num_devices=None: (" ".join(device_kind.split()[:2])
                                                   + (f"-{num_devices}" if num_devices else ""))
    try:
        yield
    finally:
        tb.get_tpu_version, tb.get_device_name = saved


@contextlib.contextmanager
def tracing_for(mesh: AbstractMesh) -> Iterator[None]:
    """Traces programs (kernel choices, Pallas interpret mode, TPU generation) for `mesh`'s
    abstract device instead of this process's backend."""
    device = mesh.abstract_device
    if device is None:
        raise ValueError("tracing for another platform needs an AbstractMesh with an "
                         "abstract_device; build it with `abstract_mesh`")
    with jax.sharding.use_abstract_mesh(mesh):
        if device.platform == "tpu":
            with _ragged_kernel_generation(device.device_kind):
                yield
        else:
            yield


@contextlib.contextmanager
def compiling_for(mesh: AbstractMesh) -> Iterator[None]:
    """`tracing_for(mesh)`, with jax's persistent compilation cache off: an executable compiled
    for devices this process does not have cannot be read back (jax warns on every such entry)."""
    from jax.experimental.compilation_cache import compilation_cache

    if not jax.config.jax_compilation_cache_dir:  # no persistent cache: nothing to keep out
        with tracing_for(mesh):
            yield
        return
    saved = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether to use the cache
    try:
        with tracing_for(mesh):
            yield
    finally:
        jax.config.update("jax_enable_compilation_cache", saved)
        compilation_cache.reset_cache()


def lower(name: str, trace: Callable[[], jax.stages.Traced], mesh: AbstractMesh
          ) -> LoweredProgram:
    """Traces `trace()` for `mesh`'s abstract device and lowers it for that platform; a failure
    is returned (as `error`), not raised, so a report can list every program."""
    platform = lowering_platform(mesh.abstract_device.platform)
    t0 = time.perf_counter()
    try:
        with tracing_for(mesh):
            text = trace().lower(lowering_platforms=(platform,)).as_text()
    except Exception as e:  # noqa: BLE001 - reported with the program's name
        message = str(e).strip().splitlines()
        return LoweredProgram(name, platform, time.perf_counter() - t0,
                              error=f"{type(e).__name__}: {message[0] if message else ''}")
    target = KERNEL_TARGETS.get(platform)
    calls = text.count(f"custom_call @{target}(") if target else 0
    pattern = _KERNEL_NAME.get(platform)
    kernels = tuple(sorted(set(pattern.findall(text)))) if pattern else ()
    return LoweredProgram(name, platform, time.perf_counter() - t0, kernels, calls)


def libtpu_installed() -> bool:
    """True when libtpu (XLA:TPU) can be loaded for deviceless compilation."""
    return importlib.util.find_spec("libtpu") is not None


def tpu_topology_devices(topology: Topology) -> list[jax.Device]:
    """The devices of TPU slice `topology` (one per chip, every host's), for compiling with
    XLA:TPU on a machine without TPUs: jit over a mesh of them compiles; nothing can run."""
    if topology.kind != "tpu":
        raise UserError(f"{topology.name} is not a TPU slice: deviceless compilation is for TPUs "
                        "(plan GPUs with --compiler=cpu)")
    if not libtpu_installed():
        raise UserError(f"compiling for {topology.name} without a TPU needs libtpu: pip install "
                        f"'{LIBTPU_REQUIREMENT}' (the version jax[tpu] pins for this jax), or plan "
                        "with --compiler=cpu")
    grid = chip_grid(topology)
    # libtpu reads its worker identity from the environment when it loads; a planner is no TPU
    # worker, and several planners (test workers) may load it at once.
    for key, value in (("TPU_ACCELERATOR_TYPE", topology.name), ("TPU_WORKER_ID", "0"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)
    from jax.experimental.topologies import get_topology_desc
    per_host = (2, 4, 1) if len(grid) == 2 and topology.chips == 8 else (2, 2, 1)
    desc = get_topology_desc(
        platform="tpu", topology_name=f"{topology.topology_prefix}:{'x'.join(map(str, grid))}",
        chip_config_name="megacore" if topology.cores_per_chip == 2 else "default",
        chips_per_host_bounds=per_host, num_slices=1)
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"libtpu described {len(devices)} devices for {topology.name}, which "
                           f"has {topology.chips} chips")
    return devices


__all__ = ["KERNEL_TARGETS", "LoweredProgram", "lowering_platform", "abstract_mesh",
           "tracing_for", "compiling_for", "lower", "LIBTPU_REQUIREMENT", "libtpu_installed",
           "tpu_topology_devices"]
