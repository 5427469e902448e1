"""Grain loader: seeded, multi-epoch, per-host batches of PromptRecords with exactly restorable state."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import grain

from data_pipeline.records import DataError

T = TypeVar("T")
_STATE_VERSION = 1


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """Fills unset shard arguments from JAX (one shard per host process)."""
    if shard_index is None or shard_count is None:
        import jax  # deferred: the data pipeline is usable without initialising a JAX backend

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}"
        )
    return shard_index, shard_count


def make_batch_dataset(
    source: Sequence[T],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> grain.MapDataset:
    """A MapDataset whose element k is this shard's k-th batch (a list of `batch_size` records).

    The stream is defined globally, independent of the number of hosts: the record indices are
    shuffled (a fresh permutation per epoch), repeated, and cut into global batches of
    `batch_size * shard_count`; shard h takes slice [h*batch_size, (h+1)*batch_size) of each.
    So every host yields the same number of batches, shards never overlap, and epochs flow into
    each other without a short batch. Only the indices are shuffled; records are read lazily.
    """
    if len(source) == 0:
        raise DataError("the record source is empty; check the dataset path and the malformed-row log")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
    global_batch = batch_size * shard_count
    if num_epochs is not None and drop_remainder and len(source) * num_epochs < global_batch:
        raise DataError(
            f"{len(source)} records x {num_epochs} epochs cannot fill one global batch of {global_batch} "
            f"(batch_size {batch_size} x {shard_count} shards); lower batch_size (trainer.gen_batch_size) "
            "or raise num_epochs (data.num_epochs, 0 = repeat forever)"
        )
    indices = grain.MapDataset.range(len(source))
    if shuffle:
        indices = indices.shuffle(seed=seed)
    indices = indices.repeat(num_epochs)
    start = shard_index * batch_size
    return indices.batch(global_batch, drop_remainder=drop_remainder, batch_fn=list).map(
        lambda global_indices: [source[i] for i in global_indices[start : start + batch_size]]
    )


class PromptBatchIterator:
    """`next(it)` gives this host's next list of `batch_size` PromptRecords; state round-trips exactly.

    Works over any random-access record source: an in-memory list or a `RecordDataSource` over
    TFDS array_record files. `num_epochs=None` repeats forever (the trainer decides when to stop).
    """

    def __init__(
        self,
        source: Sequence[Any],
        *,
        batch_size: int,
        seed: int = 0,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = True,
        read_options: grain.ReadOptions | None = None,
    ):
        shard_index, shard_count = _default_shard(shard_index, shard_count)
        self._num_records = len(source)
        self._config = {
            "batch_size": batch_size,
            "seed": seed,
            "num_epochs": num_epochs,
            "shard_index": shard_index,
            "shard_count": shard_count,
            "shuffle": shuffle,
            "drop_remainder": drop_remainder,
            "num_records": self._num_records,
        }
        self._dataset = make_batch_dataset(
            source,
            batch_size=batch_size,
            seed=seed,
            num_epochs=num_epochs,
            shard_index=shard_index,
            shard_count=shard_count,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
        )
        # In-memory / local array_record reads are cheap: no reader threads unless asked for.
        options = read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = self._dataset.to_iter_dataset(options).__iter__()
        self._batches_served = 0

    def __iter__(self) -> PromptBatchIterator:
        return self

    def __next__(self) -> list[Any]:
        batch = next(self._iterator)
        self._batches_served += 1
        return batch

    @property
    def batch_size(self) -> int:
        """Records per batch on this host."""
        return self._config["batch_size"]

    @property
    def epoch(self) -> int:
        """0-based epoch of the next record to be served (global stream position / dataset size)."""
        consumed = self._batches_served * self.batch_size * self._config["shard_count"]
        return consumed // self._num_records

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; `set_state` on an identically configured iterator resumes exactly."""
        return {
            "version": _STATE_VERSION,
            "batches_served": self._batches_served,
            "grain": self._iterator.get_state(),
            "config": dict(self._config),
        }

    def set_state(self, state: dict[str, Any] | bytes | str) -> None:
        """Restores a `get_state()` result (the dict, or its JSON as str/bytes)."""
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a PromptBatchIterator state (version {_STATE_VERSION}): {state!r:.200}")
        saved = state.get("config", {})
        mismatched = {k: (saved.get(k), v) for k, v in self._config.items() if saved.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"iterator state was saved with a different loader setup ({details}); rebuild it alike")
        self._iterator.set_state(state["grain"])
        self._batches_served = int(state["batches_served"])


def get_state_bytes(iterator: PromptBatchIterator) -> bytes:
    """The iterator state as UTF-8 JSON bytes (for checkpoint files)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()
