"""Dynamic sampling (DAPO paper Eq. 11, Sec. 3.2): train only on prompt groups whose outcomes vary.

Eq. 11 constrains the objective to groups with ``0 < |{o_i : is_equivalent(a, o_i)}| < G``: a group
whose G responses are all right or all wrong has zero advantage (Eq. 9) and only dilutes the batch.
DAPO over-samples: it keeps generating batches of prompts, drops the constant groups, and trains once
``train_batch_size`` groups are kept.

* :func:`keep_groups` is the pure filter.
* :class:`DynamicSamplingAccumulator` is the host-side loop state (verl's ``num_gen_batches`` /
  ``num_prompt_in_batch`` bookkeeping in ``recipe/dapo``), with two fixes to verl's well-known
  complaints: surplus kept groups can be carried over to the next step instead of being thrown
  away, and hitting ``max_num_gen_batches`` can proceed with a smaller batch instead of crashing.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping

import numpy as np

__all__ = [
    "DynamicSamplingAccumulator",
    "DynamicSamplingCapError",
    "FilterMetric",
    "keep_groups",
    "select_filter_metric",
]

_STATE_VERSION = 1
_PENDING = "pending/"


class FilterMetric(str, enum.Enum):
    """Which per-sample value decides whether a group varies (verl's ``filter_groups.metric``)."""

    ACC = "acc"  # unshaped accuracy (0/1): exactly Eq. 11; the default
    SCORE = "score"  # shaped score (accuracy reward + overlong penalty)


def select_filter_metric(name: str | FilterMetric, *, acc, score):
    """Return the array that :func:`keep_groups` should see for the chosen filter metric."""
    try:
        kind = FilterMetric(name)
    except ValueError:
        raise ValueError(f"Unknown filter metric {name!r}; choose one of {[m.value for m in FilterMetric]}.") from None
    return acc if kind is FilterMetric.ACC else score


def keep_groups(metric, *, keep_singletons: bool = True):
    """Bool ``[P]``: keep prompt group p iff ``metric[p, :]`` is not constant (Eq. 11).

    Works on numpy and jax arrays (jittable). ``metric`` is ``[P, G]`` (one row per prompt group),
    usually the 0/1 accuracy (``max != min`` <=> some but not all responses are correct) or the
    shaped score. With ``G == 1`` nothing can vary; like verl, such groups are kept when
    ``keep_singletons`` (otherwise dynamic sampling could never fill a batch).
    """
    if metric.ndim != 2:
        raise ValueError(f"metric must be [P, G], got shape {tuple(metric.shape)}.")
    varies = metric.max(axis=1) != metric.min(axis=1)
    if metric.shape[1] == 1 and keep_singletons:
        return varies | True
    return varies


class DynamicSamplingCapError(RuntimeError):
    """Raised when ``max_num_gen_batches`` is hit before enough groups were kept (``on_cap="error"``)."""


def _to_numpy(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(x)


class DynamicSamplingAccumulator:
    """Collects kept prompt groups across generation batches until a training batch is full.

    Trainer loop (one training step)::

        while not acc.should_stop_sampling():
            batch, metric = generate_and_score(next_prompts)   # batch: dict of [P*G, ...] numpy arrays
            acc.add(batch, metric)                             # metric: [P, G]
        train_batch, ds_metrics = acc.emit()

    Args:
      train_batch_size: prompt groups per training step.
      group_size: responses per prompt (G); each group's G samples are contiguous in ``batch``.
      max_num_gen_batches: cap on generation batches per training step; ``0`` = unlimited (verl).
      on_cap: what happens when the cap is hit with fewer than ``train_batch_size`` kept groups:
        ``"error"`` (verl) raises :class:`DynamicSamplingCapError` from :meth:`add`; ``"proceed"``
        lets :meth:`emit` return the groups kept so far (a smaller batch; an error if there are none).
      carry_over: keep surplus kept groups for the next step (they are one policy update stale,
        like the rest of an off-by-one batch). verl discards them (``carry_over=False``).
      filter_metric: ``"acc"`` or ``"score"``: what the ``metric`` passed to :meth:`add` is. With
        ``"acc"`` it also yields the all-correct / all-wrong fractions; with ``"score"`` pass
        ``acc=`` to :meth:`add` to get them.
    """

    def __init__(
        self,
        train_batch_size: int,
        group_size: int,
        *,
        max_num_gen_batches: int = 0,
        on_cap: str = "error",
        carry_over: bool = True,
        filter_metric: str | FilterMetric = FilterMetric.ACC,
    ):
        if int(train_batch_size) != train_batch_size or train_batch_size < 1:
            raise ValueError(f"train_batch_size must be a positive int, got {train_batch_size}.")
        if int(group_size) != group_size or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size}.")
        if int(max_num_gen_batches) != max_num_gen_batches or max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches must be an int >= 0 (0 = unlimited), got {max_num_gen_batches}.")
        if on_cap not in ("error", "proceed"):
            raise ValueError(f"on_cap must be 'error' or 'proceed', got {on_cap!r}.")
        self.train_batch_size = int(train_batch_size)
        self.group_size = int(group_size)
        self.max_num_gen_batches = int(max_num_gen_batches)
        self.on_cap = on_cap
        self.carry_over = bool(carry_over)
        self.filter_metric = FilterMetric(filter_metric)
        self._chunks: list[dict[str, np.ndarray]] = []
        self._num_kept = 0
        self._reset_step_counters(carried_in=0)

    # ---------------------------------------------------------------- state of the current step

    def _reset_step_counters(self, carried_in: int) -> None:
        self._num_gen_batches = 0
        self._groups_generated = 0
        self._groups_kept_new = 0
        self._groups_with_acc = 0
        self._all_correct = 0
        self._all_wrong = 0
        self._carried_in = carried_in

    @property
    def num_gen_batches(self) -> int:
        """Generation batches added since the last :meth:`emit`."""
        return self._num_gen_batches

    @property
    def num_kept_groups(self) -> int:
        """Kept groups waiting to be emitted (carried-over ones included)."""
        return self._num_kept

    def ready(self) -> bool:
        """``train_batch_size`` groups are kept: :meth:`emit` returns a full batch."""
        return self._num_kept >= self.train_batch_size

    def cap_reached(self) -> bool:
        """This step used ``max_num_gen_batches`` generation batches (never, when the cap is 0)."""
        return self.max_num_gen_batches > 0 and self._num_gen_batches >= self.max_num_gen_batches

    def should_stop_sampling(self) -> bool:
        """The trainer should stop drawing generation batches and call :meth:`emit`."""
        return self.ready() or self.cap_reached()

    # ---------------------------------------------------------------- adding

    def _field_spec(self) -> dict[str, tuple] | None:
        if not self._chunks:
            return None
        return {k: v.shape[1:] for k, v in self._chunks[0].items()}

    def add(self, batch: Mapping[str, Any], metric, *, acc=None) -> int:
        """Add one generation batch; returns how many of its groups were kept.

        Args:
          batch: field name -> array with leading axis ``P * G`` (group p's samples at rows
            ``p*G .. p*G+G-1``). Any dtype, including object/str arrays. Every batch must have the
            same fields with the same trailing shapes (pad responses to a fixed length).
          metric: ``[P, G]`` filter metric (see ``filter_metric``), e.g. accuracy.
          acc: optional ``[P, G]`` 0/1 accuracy for the all-correct/all-wrong metrics when
            ``filter_metric="score"``.
        Raises:
          DynamicSamplingCapError: ``on_cap="error"`` and this batch hit ``max_num_gen_batches``
            without filling the training batch (the batch's kept groups are still stored).
        """
        metric = _to_numpy(metric)
        g = self.group_size
        if metric.ndim != 2 or metric.shape[1] != g:
            raise ValueError(f"metric must be [P, G] with G=group_size={g}, got shape {metric.shape}.")
        if np.issubdtype(metric.dtype, np.floating) and np.isnan(metric).any():
            raise ValueError("metric contains NaN; check the reward function.")
        p = metric.shape[0]
        if not batch:
            raise ValueError("batch must have at least one field.")
        arrays = {str(k): _to_numpy(v) for k, v in batch.items()}
        for k, v in arrays.items():
            if v.ndim == 0 or v.shape[0] != p * g:
                raise ValueError(
                    f"batch[{k!r}] has leading dim {v.shape[:1]}, expected P*G = {p}*{g} = {p * g} "
                    f"(metric is [{p}, {g}])."
                )
        spec = self._field_spec()
        if spec is not None:
            if set(spec) != set(arrays):
                raise ValueError(
                    f"batch fields {sorted(arrays)} differ from earlier batches' {sorted(spec)}; every "
                    f"generation batch must carry the same fields."
                )
            for k, v in arrays.items():
                if v.shape[1:] != spec[k]:
                    raise ValueError(
                        f"batch[{k!r}] has trailing shape {v.shape[1:]} but earlier batches had {spec[k]}; "
                        f"pad every generation batch to the same length (e.g. max_response_length)."
                    )

        kept = np.asarray(keep_groups(metric))
        if acc is None and self.filter_metric is FilterMetric.ACC:
            acc = metric
        if acc is not None:
            acc = _to_numpy(acc).astype(np.float64)
            if acc.shape != metric.shape:
                raise ValueError(f"acc must be [P, G]={list(metric.shape)}, got {list(acc.shape)}.")
            self._groups_with_acc += p
            self._all_correct += int(np.all(acc == 1, axis=1).sum())
            self._all_wrong += int(np.all(acc == 0, axis=1).sum())

        n_kept = int(kept.sum())
        if n_kept:
            rows = np.repeat(kept, g)
            self._chunks.append({k: v[rows] for k, v in arrays.items()})  # fancy index = private copy
            self._num_kept += n_kept
        self._num_gen_batches += 1
        self._groups_generated += p
        self._groups_kept_new += n_kept

        if self.on_cap == "error" and self.cap_reached() and not self.ready():
            raise DynamicSamplingCapError(
                f"Dynamic sampling used {self._num_gen_batches} generation batches "
                f"(max_num_gen_batches={self.max_num_gen_batches}) but kept only {self._num_kept} of "
                f"train_batch_size={self.train_batch_size} prompt groups ({self._groups_kept_new} of "
                f"{self._groups_generated} generated groups had varying outcomes). Raise "
                f"max_num_gen_batches (0 = unlimited), set on_cap='proceed' to train on the groups kept "
                f"so far, lower train_batch_size, or check the reward function / data difficulty "
                f"(all-correct groups: {self._all_correct}, all-wrong: {self._all_wrong})."
            )
        return n_kept

    # ---------------------------------------------------------------- emitting

    def emit(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Return ``(batch, metrics)`` for one training step and start the next step.

        ``batch`` holds exactly ``train_batch_size`` groups (``train_batch_size * G`` rows, oldest
        kept groups first), or, when the cap was hit with ``on_cap="proceed"``, all kept groups.
        Surplus kept groups are carried over (``carry_over=True``) or discarded.
        """
        if not self.ready():
            if not self.cap_reached():
                raise RuntimeError(
                    f"emit() called with {self._num_kept} of {self.train_batch_size} groups kept and the "
                    f"generation cap not reached; keep calling add() until should_stop_sampling()."
                )
            if self._num_kept == 0:
                raise RuntimeError(
                    f"Dynamic sampling hit max_num_gen_batches={self.max_num_gen_batches} with zero kept "
                    f"groups: every group was all-correct or all-wrong (all-correct: {self._all_correct}, "
                    f"all-wrong: {self._all_wrong} of {self._groups_generated}). Nothing to train on; check "
                    f"the reward function and data difficulty, or raise max_num_gen_batches."
                )
        n_emit = min(self._num_kept, self.train_batch_size)
        rows = n_emit * self.group_size
        merged = {k: np.concatenate([c[k] for c in self._chunks], axis=0) for k in self._chunks[0]}
        out = {k: v[:rows] for k, v in merged.items()}
        surplus = self._num_kept - n_emit
        carried = surplus if self.carry_over else 0

        metrics = {
            "train/num_gen_batches": self._num_gen_batches,
            "dynamic_sampling/generated_groups": self._groups_generated,
            "dynamic_sampling/kept_groups": self._groups_kept_new,
            "dynamic_sampling/dropped_groups": self._groups_generated - self._groups_kept_new,
            "dynamic_sampling/kept_frac": self._groups_kept_new / max(self._groups_generated, 1),
            "dynamic_sampling/carried_in_groups": self._carried_in,
            "dynamic_sampling/carried_over_groups": carried,
            "dynamic_sampling/discarded_groups": surplus - carried,
            "dynamic_sampling/emitted_groups": n_emit,
            "dynamic_sampling/cap_reached": int(self.cap_reached()),
        }
        if self._groups_with_acc:
            metrics["dynamic_sampling/frac_all_correct"] = self._all_correct / self._groups_with_acc
            metrics["dynamic_sampling/frac_all_wrong"] = self._all_wrong / self._groups_with_acc

        self._chunks = [{k: v[rows:] for k, v in merged.items()}] if carried else []
        self._num_kept = carried
        self._reset_step_counters(carried_in=carried)
        return out, metrics

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """A flat dict of python scalars and numpy arrays (save with Orbax, ``np.savez`` or JSON).

        Pending kept groups are stored as ``"pending/<field>"`` arrays. Object-dtype fields need
        pickling (``np.load(..., allow_pickle=True)``) or conversion by the caller.
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "group_size": self.group_size,
            "num_kept_groups": self._num_kept,
            "num_gen_batches": self._num_gen_batches,
            "groups_generated": self._groups_generated,
            "groups_kept_new": self._groups_kept_new,
            "groups_with_acc": self._groups_with_acc,
            "all_correct": self._all_correct,
            "all_wrong": self._all_wrong,
            "carried_in": self._carried_in,
        }
        if self._chunks:
            for k in self._chunks[0]:
                state[_PENDING + k] = np.concatenate([c[k] for c in self._chunks], axis=0)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (values may come back as 0-d numpy arrays)."""

        def scalar(key: str) -> int:
            if key not in state:
                raise ValueError(f"dynamic-sampling state is missing {key!r}; was it saved by state_dict()?")
            return int(np.asarray(state[key]).item())

        if scalar("version") != _STATE_VERSION:
            raise ValueError(f"Unsupported dynamic-sampling state version {scalar('version')}.")
        if scalar("group_size") != self.group_size:
            raise ValueError(
                f"Checkpoint was made with group_size={scalar('group_size')} but this accumulator has "
                f"group_size={self.group_size}; the pending groups cannot be reused."
            )
        num_kept = scalar("num_kept_groups")
        pending = {k[len(_PENDING):]: np.asarray(v) for k, v in state.items() if k.startswith(_PENDING)}
        for k, v in pending.items():
            if v.ndim == 0 or v.shape[0] != num_kept * self.group_size:
                raise ValueError(
                    f"state[{_PENDING + k!r}] has {v.shape[:1]} rows, expected num_kept_groups*group_size = "
                    f"{num_kept * self.group_size}."
                )
        if num_kept and not pending:
            raise ValueError(f"state says {num_kept} pending groups but holds no '{_PENDING}<field>' arrays.")
        self._chunks = [pending] if num_kept else []
        self._num_kept = num_kept
        self._num_gen_batches = scalar("num_gen_batches")
        self._groups_generated = scalar("groups_generated")
        self._groups_kept_new = scalar("groups_kept_new")
        self._groups_with_acc = scalar("groups_with_acc")
        self._all_correct = scalar("all_correct")
        self._all_wrong = scalar("all_wrong")
        self._carried_in = scalar("carried_in")
