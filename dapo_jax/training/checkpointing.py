"""The checkpoint layout of a training workdir, shared by the trainer and `evaluate`.

`<workdir>/checkpoints/<step>/` holds four Orbax items: `params` and `opt_state` (sharded arrays),
`accumulator` (the dynamic-sampling groups carried to the next step, host arrays) and `meta` (JSON:
step, data-iterator state, accumulator scalars, model config). A step directory exists only once
all four are written, so a kill at any moment leaves the previous step restorable.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointStore:
    """Saves and restores training state under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int | None = None,
                 async_save: bool = False):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            os.fspath(self.directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=async_save))

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps() or [])

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, *, params: Any, opt_state: Any, arrays: dict[str, np.ndarray],
             meta: dict[str, Any]) -> None:
        """Writes one step (asynchronously when enabled); `arrays` are host arrays (may be empty)."""
        arrays = {k: v for k, v in arrays.items() if v.size}
        arrays["_present"] = np.ones((1,), np.int8)  # Orbax cannot save an empty tree
        meta = dict(meta, arrays=sorted(arrays))
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            accumulator=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, *, params_like: Any, opt_state_like: Any
                ) -> tuple[Any, Any, dict[str, np.ndarray], dict[str, Any]]:
        """(params, opt_state, host arrays, meta) of `step`, placed like the `*_like` trees."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(params_like)),
            opt_state=ocp.args.StandardRestore(abstract_like(opt_state_like)),
            accumulator=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore()))
        arrays = {k: np.asarray(v) for k, v in restored.accumulator.items() if k != "_present"}
        return restored.params, restored.opt_state, arrays, dict(restored.meta)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of `step` (e.g. its model config) without loading any array."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of `step` (evaluation), placed as `abstract_params` says."""
        return self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params))).params

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
