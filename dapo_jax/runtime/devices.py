"""Published numbers of the accelerators we run on: dense bf16 peak FLOP/s and HBM bandwidth.

The one table behind MFU in the trainer's metrics and in the benchmarks' reports.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Published numbers of one accelerator: dense bf16 matmul peak and HBM bandwidth."""

    name: str
    peak_bf16_flops: float  # FLOP/s, dense (no sparsity)
    hbm_bytes_per_s: float


# Matched in order against the lower-cased `jax.Device.device_kind`; every listed substring of one
# alternative must occur. Specific variants come before the generic name they contain
# ("h100" + "pcie" before "h100", "tpu v5 lite" before "tpu v5").
_DEVICE_SPECS: list[tuple[tuple[tuple[str, ...], ...], DeviceSpec]] = [
    ((("h200",),), DeviceSpec("NVIDIA H200", 989e12, 4.8e12)),
    ((("h100", "pcie"),), DeviceSpec("NVIDIA H100 PCIe", 756e12, 2.0e12)),
    ((("h100",),), DeviceSpec("NVIDIA H100 SXM", 989e12, 3.35e12)),
    ((("a100", "80gb"),), DeviceSpec("NVIDIA A100-80GB", 312e12, 2.0e12)),
    ((("a100",),), DeviceSpec("NVIDIA A100-40GB", 312e12, 1.555e12)),
    ((("tpu v6 lite",), ("tpu v6e",)), DeviceSpec("TPU v6e", 918e12, 1.64e12)),
    ((("tpu v5 lite",), ("tpu v5e",)), DeviceSpec("TPU v5e", 197e12, 8.1e11)),
    ((("tpu v5",),), DeviceSpec("TPU v5p", 459e12, 2.76e12)),
    ((("tpu v4",),), DeviceSpec("TPU v4", 275e12, 1.2e12)),
]


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The published peak numbers for a `device_kind` string, or None when it is not in the table."""
    kind = device_kind.lower()
    for alternatives, spec in _DEVICE_SPECS:
        if any(all(part in kind for part in alt) for alt in alternatives):
            return spec
    return None


def known_devices() -> list[DeviceSpec]:
    """Every device in the peak table (for documentation and reports)."""
    return [spec for _, spec in _DEVICE_SPECS]


def peak_flops_per_device() -> float:
    """This process's accelerator's dense bf16 peak, or 0 when unknown (CPU: MFU is not reported)."""
    import jax

    spec = device_spec(jax.devices()[0].device_kind)
    return spec.peak_bf16_flops if spec else 0.0
