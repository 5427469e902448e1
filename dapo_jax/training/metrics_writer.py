"""Per-step metrics in the workdir (process 0 only): one object per step, TensorBoard, optional W&B.

Layout: `<workdir>/metrics/step_00000012.jsonl` holds step 12's record as one JSON line. One object
per step is what object stores can do (gs:// has no append: `open("a")` rewrites the object), and it
makes a resumed run idempotent: a step the killed run logged but did not checkpoint is written again
to the same name, and `resume_from(step)` deletes every record past the restored checkpoint. So each
step is held once, whenever the run was killed. `cat <workdir>/metrics/*.jsonl` is the classic
metrics.jsonl (names sort by step); `read_metrics` returns the records in step order (and still reads
the `metrics.jsonl` of older workdirs, the per-step objects taking precedence).

TensorBoard: a resumed run opens a new event file with `purge_step = restored step + 1` (0 when no
checkpoint was restored), which tells TensorBoard to drop every older event at or after that step,
so a step is shown once. Events are flushed after every step, so a kill loses none.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Mapping

from etils import epath

log = logging.getLogger(__name__)

METRICS_DIR = "metrics"
LEGACY_FILE = "metrics.jsonl"
_NAME = re.compile(r"^step_(\d+)\.jsonl$")


def step_path(workdir: epath.PathLike, step: int) -> epath.Path:
    """The object that holds `step`'s record."""
    return epath.Path(workdir) / METRICS_DIR / f"step_{step:08d}.jsonl"


def _write_atomically(path: epath.Path, text: str) -> None:
    """Whole-object write: a reader (or a kill) never sees half a record."""
    if "://" in os.fspath(path):
        path.write_text(text)  # an object store creates objects atomically
        return
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(path))


class MetricsWriter:
    """Writes one record per step and mirrors its scalars to TensorBoard (and W&B when configured).

    `wandb` is {"project", "entity", "name", "config"} or None: the run is then logged to Weights &
    Biases under the same metric names as TensorBoard (`wandb` is imported only then).
    """

    def __init__(self, workdir: epath.PathLike, *, enabled: bool = True,
                 wandb: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / METRICS_DIR
        self._tb = None
        self._tb_started = False
        self._purge_step: int | None = None
        self._wandb_settings = dict(wandb) if wandb and wandb.get("project") else None
        self._wandb = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)

    def resume_from(self, step: int) -> None:
        """The run continues after checkpoint `step`: drops every record past it (a killed run
        may have logged steps it never checkpointed; they are about to be replayed)."""
        if not self.enabled:
            return
        for s, path in _step_objects(self.directory):
            if s > step:
                path.unlink()
        # Restored at 0 (no checkpoint): the whole killed run is replayed, step 0 included.
        self._purge_step = step + 1 if step > 0 else 0

    def _start_tensorboard(self) -> None:
        self._tb_started = True
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.fspath(self.workdir / "tensorboard"),
                                     purge_step=self._purge_step)
        except Exception as e:  # noqa: BLE001 - the per-step records are the record; say why TB is off
            log.warning("TensorBoard output is off (%s: %s); metrics still go to %s",
                        type(e).__name__, e, self.directory)
            self._tb = None

    def _start_wandb(self) -> None:
        s = self._wandb_settings
        import wandb  # the optional extra: pip install 'dapo_jax[wandb]'

        # One W&B run per workdir: its id is kept in the workdir, so a resumed run continues it.
        id_path = self.workdir / "run" / "wandb_id"
        run_id = id_path.read_text().strip() if id_path.exists() else None
        self._wandb = wandb.init(project=s["project"], entity=s.get("entity") or None,
                                 name=s.get("name") or self.workdir.name, id=run_id,
                                 resume="allow", config=s.get("config"))
        if run_id is None and getattr(self._wandb, "id", None):
            id_path.parent.mkdir(parents=True, exist_ok=True)
            id_path.write_text(str(self._wandb.id))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records the metrics of `step` (replacing a record of the same step)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        _write_atomically(step_path(self.workdir, step), json.dumps({"step": step, **clean}) + "\n")
        if not self._tb_started:
            self._start_tensorboard()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()  # a kill must not lose logged steps that a checkpoint then covers
        if self._wandb_settings is not None:
            if self._wandb is None:
                self._start_wandb()
            self._wandb.log(clean, step=step)

    def flush(self) -> None:
        """Flushes TensorBoard events."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer and finishes the W&B run."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _step_objects(directory: epath.Path) -> list[tuple[int, epath.Path]]:
    if not directory.exists():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, key=lambda x: x[0])


def read_metrics(workdir: epath.PathLike) -> list[dict[str, float]]:
    """Every step's record, in step order, each step once."""
    workdir = epath.Path(workdir)
    by_step: dict[int, dict] = {}
    legacy = workdir / LEGACY_FILE
    if legacy.exists():  # workdirs written before the per-step layout: the last line of a step wins
        for line in legacy.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    for step, path in _step_objects(workdir / METRICS_DIR):
        text = path.read_text().strip()
        if text:
            by_step[step] = json.loads(text)
    return [by_step[s] for s in sorted(by_step)]
