"""Counts the programs JAX really traces, lowers and compiles, from `jax.monitoring` events.

Summing `_cache_size()` over jitted functions that exist *now* misses programs built by jit objects
that are created anew (a closure re-jitted on every weight swap, say): each new object starts with an
empty cache. The events below are recorded by JAX itself for every program, whichever jit object asks:

- `/jax/core/compile/jaxpr_trace_duration`: a Python function traced to a jaxpr for `jit`.
- `/jax/core/compile/jaxpr_to_mlir_module_duration`: a jaxpr lowered to an MLIR module.
- `/jax/core/compile/backend_compile_duration`: an executable requested from the backend. It wraps
  `compile_or_get_cached`, so it fires whether XLA compiles or the persistent compilation cache
  (tests/conftest.py turns it on) supplies the executable: a rebuilt program counts even when it
  costs no XLA time in the test, as it would cost a full compile in a run without that cache.

A call that reuses a compiled program (JAX's in-memory caches) records none of them, so "zero new
compiles" means zero of each. Each event carries the program's name (`jit(fn)`), which the counter
keeps so a failure says what recompiled. `/jax/compilation_cache/cache_hits` (the compiles the
persistent cache served) is counted too, only to show in messages how many compiles it hid.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from typing import Iterator

from jax import monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
PERSISTENT_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_KINDS = {TRACE_EVENT: "traces", LOWER_EVENT: "lowerings", COMPILE_EVENT: "compiles"}


@dataclasses.dataclass
class CompileLog:
    """Names of the programs traced, lowered and compiled while the counter was listening."""

    traces: list[str] = dataclasses.field(default_factory=list)
    lowerings: list[str] = dataclasses.field(default_factory=list)
    compiles: list[str] = dataclasses.field(default_factory=list)
    persistent_cache_hits: int = 0  # of the compiles, those loaded from the persistent cache

    @property
    def total(self) -> int:
        """Traces + lowerings + compiles: zero iff no program was built."""
        return len(self.traces) + len(self.lowerings) + len(self.compiles)

    def __str__(self) -> str:
        parts = []
        for kind in ("traces", "lowerings", "compiles"):
            names = collections.Counter(getattr(self, kind))
            listed = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(names.items()))
            parts.append(f"{sum(names.values())} {kind}" + (f" ({listed})" if listed else ""))
        return "; ".join(parts) + f"; {self.persistent_cache_hits} served by the persistent cache"


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileLog]:
    """Records every jit trace, lowering and backend compile (or persistent-cache load) in the block."""
    log = CompileLog()
    lock = threading.Lock()

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration
        kind = _KINDS.get(event)
        if kind is not None:
            with lock:
                getattr(log, kind).append(str(kwargs.get("fun_name", "?")))

    def hit_listener(event: str, **kwargs) -> None:
        del kwargs
        if event == PERSISTENT_HIT_EVENT:
            with lock:
                log.persistent_cache_hits += 1

    monitoring.register_event_duration_secs_listener(listener)
    monitoring.register_event_listener(hit_listener)
    try:
        yield log
    finally:
        monitoring.unregister_event_listener(hit_listener)
        monitoring.unregister_event_duration_listener(listener)
