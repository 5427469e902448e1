"""Per-step metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

from etils import epath

class MetricsWriter:
    """Appends one JSON line per step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: epath.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))
            except Exception:  # tensorboard output is optional; metrics.jsonl is the record
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records the metrics of `step`."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Flushes TensorBoard events."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: epath.PathLike) -> list[dict[str, float]]:
    """All records of `metrics.jsonl` in `workdir`."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
