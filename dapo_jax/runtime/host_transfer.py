"""Device -> host copies that are correct on one process and on many (multi-host SPMD)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of a global array: local when possible, all-gathered across processes if not.

    Never iterates a non-fully-addressable array: replicated arrays are read from a local shard,
    sharded ones are gathered with `process_allgather` (every process gets the whole array).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree: Any) -> Any:
    """`to_host` over a pytree."""
    return jax.tree.map(to_host, tree)
