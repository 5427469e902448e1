"""Stopping on SIGTERM (TPU spot preemption): finish the step, checkpoint, exit with a known code."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator

from dapo_jax.runtime.distributed import any_process

log = logging.getLogger(__name__)

# `launch/tpu.py` restarts a job that exits with this code (the job saved its checkpoint first).
PREEMPTED_EXIT_CODE = 42


class Preempted(Exception):
    """Raised after a SIGTERM once the current step's checkpoint is saved."""


class StopFlag:
    """Set by SIGTERM; `agreed()` is True on every process once any process received it."""

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        """Asks the loop to stop after the current step (what SIGTERM does)."""
        self.requested = True

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.request()
        log.warning("SIGTERM received: finishing the current step, then checkpointing and exiting")

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """Handles SIGTERM inside the block (when on the main thread) and restores the old handler."""
        try:
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: signals cannot be handled here
            previous = None
        try:
            yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def agreed(self) -> bool:
        """Whether to stop now, the same answer on every host.

        SIGTERM reaches hosts at different moments: all must stop after the same step, or the ones
        that go on wait forever in a collective for the ones that stopped.
        """
        return any_process(self.requested)
