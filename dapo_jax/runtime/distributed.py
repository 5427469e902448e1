"""Multi-process start-up: `jax.distributed.initialize` when running on several processes."""

from __future__ import annotations

import logging
import os
import uuid

from dapo_jax.runtime.cli_errors import UserError

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
            raise UserError("multi-process runs need --coordinator_address, --num_processes and "
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


def check_shared_directory(path: str | os.PathLike) -> None:
    """Raises unless every process sees the files process 0 writes in `path` (multi-process only).

    Checkpoints are written by every process into one directory and restored by every process on
    restart, and the warm-start cache and toy tokenizer are read back by all: a per-host local
    directory would save shards nobody can restore, or let processes disagree about whether a
    checkpoint exists and deadlock.
    """
    import jax
    import numpy as np
    from etils import epath
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    name = f".shared_check_{uuid.uuid4().hex}" if jax.process_index() == 0 else ""
    # Every process must use process 0's file name: broadcast it as bytes.
    raw = np.frombuffer(name.encode().ljust(64, b"\0"), np.uint8)
    name = bytes(multihost_utils.broadcast_one_to_all(raw)).rstrip(b"\0").decode()
    probe = epath.Path(path) / name
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("visible")
    multihost_utils.sync_global_devices("dapo_jax shared directory check: written")
    seen = np.asarray(multihost_utils.process_allgather(np.asarray(probe.exists(), np.int32)))
    multihost_utils.sync_global_devices("dapo_jax shared directory check: read")
    if jax.process_index() == 0:
        probe.unlink()
    blind = [i for i, ok in enumerate(seen.reshape(-1)) if not ok]
    if blind:
        raise UserError(f"--workdir {path} is not shared: process(es) {blind} cannot see a file "
                        "process 0 wrote there. Multi-process runs need a directory every host "
                        "sees (gs://bucket/path or a shared file system), because all processes "
                        "write one checkpoint there and read it back on restart.")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (one tiny all-gather if multi-process).

    For decisions every process must take together, such as stopping after a SIGTERM that reaches
    the hosts at different moments: a process that stops alone leaves the others in a collective.
    """
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32))).any())
