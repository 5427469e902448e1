"""Accelerator topologies by name (TPU slices, GPU hosts): chips, HBM per chip, cores, hosts.

TPU names follow Cloud TPU accelerator types: v4-N and v5p-N count TensorCores (2 per chip, one JAX
device per chip in megacore mode), v5e / v5litepod-N and v6e-N count chips. GPU names are
`<model>-xN` with N GPUs, 8 per host. HBM is the per-chip capacity the vendor documents; the
runtime reserves a little of it, so plan with some headroom.
"""

from __future__ import annotations

import dataclasses
import math
import re

from dapo_jax.runtime.cli_errors import UserError

GIB = 1024 ** 3
GB = 1000 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    """One accelerator generation: HBM per chip, cores per chip, and how names count devices."""

    kind: str  # "tpu" or "gpu"
    hbm_bytes: int
    cores_per_chip: int
    chips_per_host: int
    name_counts: str  # "cores" (v4-N, v5p-N), "chips" (v5e-N, v6e-N) or "gpus" (h100-80gb-xN)
    single_host_max: int = 0  # chips a single host carries when the slice is that small
    device_kind: str = ""  # what jax.devices()[0].device_kind says on this hardware
    topology_prefix: str = ""  # TPU: the generation in libtpu's topology names ("v5" in v5:4x4x4)


# Cloud TPU system-architecture pages (HBM per chip, TensorCores per chip, chips per host VM) and
# NVIDIA data sheets. v5e / v6e hosts carry 8 chips in single-host slices, 4 per host beyond that.
GENERATIONS: dict[str, Generation] = {
    "v4": Generation("tpu", 32 * GIB, 2, 4, "cores", device_kind="TPU v4", topology_prefix="v4"),
    "v5e": Generation("tpu", 16 * GIB, 1, 4, "chips", single_host_max=8,
                      device_kind="TPU v5 lite", topology_prefix="v5e"),
    "v5p": Generation("tpu", 95 * GIB, 2, 4, "cores", device_kind="TPU v5", topology_prefix="v5"),
    "v6e": Generation("tpu", 32 * GIB, 1, 4, "chips", single_host_max=8,
                      device_kind="TPU v6 lite", topology_prefix="v6e"),
    "h100-80gb": Generation("gpu", 80 * GIB, 1, 8, "gpus", device_kind="NVIDIA H100 80GB HBM3"),
    "h200": Generation("gpu", 141 * GB, 1, 8, "gpus", device_kind="NVIDIA H200"),
    "a100-80gb": Generation("gpu", 80 * GIB, 1, 8, "gpus", device_kind="NVIDIA A100-SXM4-80GB"),
}
ALIASES = {"v5litepod": "v5e"}
KNOWN_FORMS = ("v4-N (N TensorCores, 2 per chip)", "v5e-N / v5litepod-N (N chips)",
               "v5p-N (N TensorCores, 2 per chip)", "v6e-N (N chips)", "h100-80gb-xN",
               "h200-xN", "a100-80gb-xN")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice or host group: `chips` JAX devices with `hbm_bytes` each."""

    name: str
    kind: str
    chips: int
    hbm_bytes: int
    cores_per_chip: int
    hosts: int
    device_kind: str = ""  # the chips' JAX device_kind ("" for a custom topology)
    topology_prefix: str = ""  # TPU generation as libtpu names it ("" for GPUs and custom)

    @property
    def hbm_gib(self) -> float:
        """HBM per chip in GiB."""
        return self.hbm_bytes / GIB

    @property
    def total_hbm_bytes(self) -> int:
        """HBM summed over all chips."""
        return self.hbm_bytes * self.chips


def _error(name: str, why: str) -> UserError:
    return UserError(f"Unknown topology {name!r}: {why}. Known forms: {', '.join(KNOWN_FORMS)}; "
                     "or give --devices N with --hbm_gib X for anything else")


def parse_topology(name: str) -> Topology:
    """The Topology for a name like 'v5p-128', 'v5litepod-16', 'v6e-8' or 'h100-80gb-x8'."""
    key = name.strip().lower()
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", key) or \
        re.fullmatch(r"(h100-80gb|h200|a100-80gb)-x(\d+)", key)
    if not m:
        raise _error(name, "the name does not match any known form")
    gen_name, count = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    gen = GENERATIONS[gen_name]
    if count <= 0:
        raise _error(name, "the count must be positive")
    if gen.name_counts == "cores":
        if count % gen.cores_per_chip:
            raise _error(name, f"{gen_name} names count TensorCores ({gen.cores_per_chip} per chip), "
                               f"so N must be a multiple of {gen.cores_per_chip}")
        chips = count // gen.cores_per_chip
    else:
        chips = count
    per_host = gen.single_host_max if chips <= gen.single_host_max else gen.chips_per_host
    hosts = -(-chips // per_host)
    return Topology(name=key, kind=gen.kind, chips=chips, hbm_bytes=gen.hbm_bytes,
                    cores_per_chip=gen.cores_per_chip, hosts=hosts, device_kind=gen.device_kind,
                    topology_prefix=gen.topology_prefix)


def chip_grid(topology: Topology) -> tuple[int, ...]:
    """The TPU slice's chip grid as Cloud TPU lays it out: x, y, z for 3D tori (v4, v5p: v5p-8 is
    2x2x1, v5p-32 2x2x4, v5p-128 4x4x4) and x, y for 2D (v5e, v6e: 8 chips are 2x4, 16 are 4x4)."""
    chips = topology.chips
    if topology.kind != "tpu" or chips & (chips - 1):
        raise UserError(f"{topology.name}: a chip grid needs a TPU slice with a power-of-two chip "
                        f"count, got {chips} {topology.kind} chips")
    # Doubling order from one chip: 3D 2x1x1, 2x2x1, then z, y, x in turn (2x2x2, 2x2x4, 2x4x4,
    # 4x4x4, ...); 2D 2x1, 2x2, then y, x in turn (2x4, 4x4, 4x8, ...).
    three_d = topology.cores_per_chip == 2
    grid = [1, 1, 1] if three_d else [1, 1]
    order = [0, 1, 2] + [2, 1, 0] * 20 if three_d else [0, 1] + [1, 0] * 20
    for axis in order:
        if math.prod(grid) >= chips:
            break
        grid[axis] *= 2
    return tuple(grid)


def custom_topology(devices: int, hbm_gib: float) -> Topology:
    """A topology of `devices` accelerators with `hbm_gib` GiB each (one host assumed)."""
    if devices <= 0:
        raise UserError(f"--devices must be a positive device count, got {devices}")
    if hbm_gib <= 0:
        raise UserError(f"--hbm_gib must be the positive HBM per device in GiB, got {hbm_gib}")
    return Topology(name=f"{devices}x{hbm_gib:g}GiB", kind="custom", chips=int(devices),
                    hbm_bytes=int(hbm_gib * GIB), cores_per_chip=1, hosts=1)
