"""Device mesh and logical-axis sharding rules (MaxText-style: layouts are config, not code)."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Parameters are sharded
# FSDP-style over `fsdp` on their embed dimension and Megatron-style over `tensor` on heads / mlp / vocab;
# activations put the batch on (data, fsdp).
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    # The residual stream between layers, sequence-parallel over `tensor` (Megatron-style): the
    # activations remat keeps for the backward pass are the layer inputs, and without this every
    # tensor-parallel device would hold a full copy of them. Rows too short to split (decode)
    # stay replicated.
    "act_seq": "tensor",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "cache_batch": ("data", "fsdp"),
    "cache_seq": None,
}


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh; one axis may be -1 to absorb remaining devices.

    Default (None): every device on `fsdp`. A dict like {"data": 1, "fsdp": -1, "tensor": 2} or a
    3-sequence in MESH_AXES order is accepted.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if shape is None:
        shape = {"data": 1, "fsdp": -1, "tensor": 1}
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by "
                             f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                         f"{n} are available; set one axis to -1 to absorb the rest")
    try:
        # Explicit axis types: our shardings are named at jit boundaries (in/out_shardings and
        # sharding constraints), not carried by array types.
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)
    except Exception:  # noqa: BLE001
        # What jax.make_mesh cannot lay out (a device subset, stand-in devices in the planner's
        # arithmetic): a plain reshape in device order.
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_platform(mesh: Mesh | jax.sharding.AbstractMesh) -> str:
    """The platform ("cpu", "gpu", "tpu") of a mesh's devices, or of an abstract mesh's
    `abstract_device` (a mesh traced for hardware this process does not have)."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        if mesh.abstract_device is None:
            raise ValueError("an AbstractMesh without an abstract_device has no platform; build it "
                             "with abstract_device=jax.sharding.AbstractDevice(...)")
        return mesh.abstract_device.platform
    return mesh.devices.flat[0].platform


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None
                    ) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec, dropping mesh axes that don't divide the dim."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for ax in axes:
            if ax in used or (mesh is not None and ax not in mesh.shape):
                continue
            size = mesh.shape[ax] if mesh is not None else 1
            if shape is not None and mesh is not None:
                current = math.prod(mesh.shape[a] for a in kept)
                if shape[i] % (current * size):
                    # e.g. 2 KV heads on a tensor axis of 4: replicate rather than fail deep in XLA.
                    continue
            kept.append(ax)
            used.add(ax)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, Any] | None = None,
                   batch_size: int | None = None) -> NamedSharding:
    """Sharding for a [batch, ...] activation/input array: batch over (data, fsdp)."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), shape, rules)


def with_logical_constraint(x: jax.Array, logical: Sequence[str | None],
                            mesh: Mesh | None, rules: Mapping[str, Any] | None = None) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical, x.shape, rules))
