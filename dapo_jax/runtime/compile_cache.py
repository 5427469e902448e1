"""The run's persistent XLA compilation cache: a restart loads its programs, not compiling them.

A preempted or resumed run builds exactly the programs it built before (same shapes, shardings and
jax version), and at the 32B shape on a pod those compiles take minutes.
`trainer.compilation_cache_dir` (applied by the command-line entry points, `dapo_jax.train` and
`dapo_jax.demo`, before anything compiles) keeps them:

* "auto" (the default): `<workdir>/xla_cache`, so the cache travels with the run's checkpoints (a
  gs:// workdir gives a cache that new VMs after a preemption still see), unless JAX already has
  a cache folder (`JAX_COMPILATION_CACHE_DIR`, or `jax.config`), which then wins;
* a path (local or gs://): that folder, shared by the runs that name it;
* "" : no persistent cache from dapo_jax (one JAX was given still applies).

Only process 0 of a multi-process run writes entries (JAX's rule); a cached program is the same
executable, so a resumed run's numbers do not change.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import jax
from etils import epath

log = logging.getLogger(__name__)

AUTO = "auto"
CACHE_FOLDER = "xla_cache"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_WRITE_EVENT = "/jax/compilation_cache/cache_misses"  # JAX records it when it writes an entry
_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"


def resolve(setting: str, workdir: str | epath.PathLike) -> str | None:
    """The cache folder `trainer.compilation_cache_dir` picks for `workdir` (or None)."""
    current = jax.config.jax_compilation_cache_dir
    if setting == AUTO:
        return current or str(epath.Path(workdir) / CACHE_FOLDER)
    return setting or current or None


def enable(setting: str, workdir: str | epath.PathLike) -> str | None:
    """Points JAX's persistent compilation cache at `resolve(setting, workdir)`; returns the folder.

    Call it before the first compile: JAX opens its cache once per process.
    """
    folder = resolve(setting, workdir)
    if folder and folder != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", folder)
    if folder:
        log.info("XLA compilation cache: %s", folder)
    return folder


def counter() -> Callable[[], dict[str, float]]:
    """Starts counting the persistent cache's use; the returned function reads the counts so far:
    programs `loaded`, the compile seconds that `saved`, and programs `written` (compiled and
    stored: those that took at least JAX's `jax_persistent_cache_min_compile_time_secs`)."""
    counts: collections.Counter = collections.Counter()

    def on_event(event: str, **_) -> None:
        if event == _HIT_EVENT:
            counts["loaded"] += 1
        elif event == _WRITE_EVENT:
            counts["written"] += 1

    def on_duration(event: str, duration: float, **_) -> None:
        if event == _SAVED_EVENT:
            counts["saved"] += max(float(duration), 0.0)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    return lambda: {"loaded": counts["loaded"], "saved": float(counts["saved"]),
                    "written": counts["written"]}


def summary(counts: dict[str, float]) -> str:
    """One line for the console: what the cache loaded, saved and wrote."""
    return (f"XLA compilation cache: {int(counts['loaded'])} programs loaded "
            f"({counts['saved']:.1f} s of compiling saved), {int(counts['written'])} written")
