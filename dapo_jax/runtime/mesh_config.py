"""`config.mesh` against the devices that exist: the sizes it asks for, or a user error naming the
`mesh.*` fields and the fix (instead of a ValueError from deep inside mesh construction)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from dapo_jax.runtime.cli_errors import UserError

AXES = ("data", "fsdp", "tensor")


def mesh_sizes(mesh: Mapping[str, Any], num_devices: int) -> dict[str, int]:
    """{"data", "fsdp", "tensor"} sizes of `mesh` (config.mesh) on `num_devices` devices, -1 resolved.

    `mesh.num_devices` (0: all) devices are used; one axis may be -1 to absorb what the others leave.
    Raises a UserError when the axes cannot tile exactly that many devices.
    """
    n = int(mesh.get("num_devices", 0) or 0) or num_devices
    given = {a: int(mesh.get(a, 1)) for a in AXES}
    shown = ", ".join(f"mesh.{a}={v}" for a, v in given.items())
    if n > num_devices:
        raise UserError(f"config.mesh.num_devices={n} asks for {n} devices but {num_devices} exist; "
                        f"set --config.mesh.num_devices to at most {num_devices} (0 uses all)")
    bad = [a for a, v in given.items() if v == 0 or v < -1]
    if bad:
        raise UserError(f"config.mesh.{bad[0]}={given[bad[0]]}: each mesh axis must be >= 1, or -1 "
                        "for the devices the other axes leave")
    free = [a for a, v in given.items() if v == -1]
    if len(free) > 1:
        raise UserError(f"config mesh ({shown}): only one axis may be -1; give the others sizes")
    fixed = math.prod(v for v in given.values() if v != -1)
    where = f"the {n} devices of the mesh" + ("" if n == num_devices else
                                               f" (config.mesh.num_devices={n})")
    if free:
        if n % fixed:
            raise UserError(f"config mesh ({shown}): the fixed axes multiply to {fixed}, which does "
                            f"not divide {where}; choose mesh.* sizes whose product divides {n}, or "
                            f"set config.mesh.num_devices to a multiple of {fixed} (at most "
                            f"{num_devices})")
        return {a: (n // fixed if v == -1 else v) for a, v in given.items()}
    if fixed < n:
        raise UserError(f"config mesh ({shown}): data*fsdp*tensor = {fixed} but the mesh spans "
                        f"{where}; set one axis to -1 (e.g. --config.mesh.fsdp=-1) to absorb the "
                        f"rest, or set config.mesh.num_devices={fixed}")
    if fixed > n:
        fix = (f"lower the mesh.* sizes, or set config.mesh.num_devices={fixed}"
               if fixed <= num_devices else f"lower the mesh.* sizes: {num_devices} devices exist")
        raise UserError(f"config mesh ({shown}): data*fsdp*tensor = {fixed} devices but the mesh "
                        f"spans {where}; {fix}")
    return dict(given)
