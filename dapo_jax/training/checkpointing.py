"""The checkpoint layout of a training workdir, shared by the trainer and `evaluate`.

`<workdir>/checkpoints/<step>/` holds four Orbax items: `params` and `opt_state` (sharded arrays),
`accumulator` (the dynamic-sampling groups carried to the next step, host arrays) and `meta` (JSON:
step, data-iterator state, accumulator scalars, model config). A step directory exists only once
all four are written, so a kill at any moment leaves the previous step restorable.

`find_step` and `restore_workdir_params` are how the readers of a finished (or running) workdir,
`evaluate --checkpoint WORKDIR` and `export --workdir WORKDIR`, pick a step and load its parameters.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dapo_jax.runtime.remote_listings import uncached_remote_listings

CHECKPOINT_DIR = "checkpoints"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointStore:
    """Saves and restores training state under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int | None = None,
                 async_save: bool = False):
        uncached_remote_listings()  # Orbax's TensorStore writes bypass gcsfs's listing cache
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


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """`workdir` as an absolute path (Orbax needs one; gs:// paths already are)."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def is_workdir(workdir: str | os.PathLike) -> bool:
    """Whether `workdir` holds a `checkpoints/` folder (a training workdir, not a HF directory)."""
    return (workdir_path(workdir) / CHECKPOINT_DIR).exists()


def find_step(workdir: str | os.PathLike, step: int | None, *, flag: str = "--workdir"
              ) -> tuple[CheckpointStore, int]:
    """(store, step): `step`, or the newest complete one when None, of a training workdir.

    User errors (naming `flag`): the workdir does not exist, holds no complete checkpoint, or has no
    checkpoint `step` (the message lists the steps it has).
    """
    from dapo_jax.runtime.cli_errors import MissingFileError, UserError

    p = workdir_path(workdir)
    if not p.exists():
        raise MissingFileError(f"{flag} {workdir} does not exist: give the --workdir of a training "
                               "run (local or gs://)")
    if not (p / CHECKPOINT_DIR).exists():
        raise MissingFileError(f"{flag} {workdir} has no {CHECKPOINT_DIR}/ folder: it is not a "
                               "training workdir, or the run stopped before its first save")
    store = CheckpointStore(p)
    steps = store.all_steps()
    if not steps:
        store.close()
        raise MissingFileError(f"{flag} {workdir}: {store.directory} holds no complete checkpoint "
                               "(the run stopped before its first save); train longer or pass "
                               "another workdir")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        store.close()
        raise UserError(f"--step {step} not in {store.directory}; available steps: {steps}")
    return store, step


def restore_workdir_params(workdir: str | os.PathLike, step: int | None, mesh: Any, *,
                           flag: str = "--workdir", **model_overrides: Any
                           ) -> tuple[Any, Any, int]:
    """(params, ModelConfig, step) of checkpoint `step` (default: latest) of a training workdir.

    The architecture is the one the checkpoint recorded (its meta's model config); `model_overrides`
    set run-time fields (dtype, remat, scan_layers). Parameters are placed on `mesh` by the model's
    sharding rules.
    """
    from flax import nnx

    from dapo_jax import models
    from dapo_jax.models.config import ModelConfig

    store, step = find_step(workdir, step, flag=flag)
    try:
        fields = dict(store.read_meta(step)["model_config"])
        fields.update(model_overrides)
        cfg = ModelConfig(**fields)
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(lambda: models.Qwen2(cfg, rngs=nnx.Rngs(0)).params()),
            models.param_shardings(cfg, mesh))
        params = store.restore_params(step, abstract)
    finally:
        store.close()
    return params, cfg, step
