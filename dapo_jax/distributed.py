"""Multi-process start-up: `jax.distributed.initialize` when running on several processes."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Initialises jax.distributed on multi-host TPU VMs (auto-detected) or from explicit flags.

    Explicit flags (GPU clusters, local multi-process tests) take precedence; on a TPU VM slice with
    more than one worker JAX discovers everything from the environment. Single-process runs do
    nothing. Returns whether jax.distributed was initialised.
    """
    import jax

    if coordinator_address or (num_processes and num_processes > 1):
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError("multi-process runs need --coordinator_address, --num_processes and "
                             "--process_id together")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
        return True
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hostnames or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        log.info("jax.distributed (TPU VM): process %d of %d", jax.process_index(),
                 jax.process_count())
        return True
    return False
