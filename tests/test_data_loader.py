"""Grain prompt-batch loader: seeded epochs, per-host shards, exactly restorable iterator state."""
import json
from collections import Counter

import pytest

from data_pipeline import (
    PromptBatchIterator,
    ToyArithmeticConfig,
    generate_toy_arithmetic,
    get_state_bytes,
    load_tfds_records,
)

RECORDS = [
    {"id": f"r{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "ground_truth": str(i)} for i in range(23)
]


def _ids(batch):
    return [r["id"] for r in batch]


def _take(iterator, n):
    return [_ids(next(iterator)) for _ in range(n)]


def _loader(**kwargs):
    settings = {"batch_size": 4, "seed": 7, "shard_index": 0, "shard_count": 1, **kwargs}
    return PromptBatchIterator(RECORDS, **settings)


@pytest.mark.parametrize("consumed", [2, 7])  # 8 records: mid-epoch; 28 > 23 records: past an epoch boundary
def test_restored_iterator_yields_exactly_the_same_next_batches(consumed):
    original = _loader()
    _take(original, consumed)
    saved = json.loads(json.dumps(original.get_state()))  # through JSON, as a checkpoint would store it
    expected = _take(original, 9)
    restored = _loader()
    restored.set_state(saved)
    assert _take(restored, 9) == expected
    from_bytes = _loader()
    from_bytes.set_state(get_state_bytes(original))
    assert from_bytes.epoch == original.epoch


def test_restored_finite_iterator_stops_at_the_same_batch():
    original = _loader(num_epochs=2)
    _take(original, 5)
    state = original.get_state()
    rest = [_ids(b) for b in original]
    restored = _loader(num_epochs=2)
    restored.set_state(state)
    assert [_ids(b) for b in restored] == rest
    assert 5 + len(rest) == (23 * 2) // 4  # the last partial batch is dropped


def test_every_epoch_is_a_fresh_seeded_permutation():
    records = RECORDS[:12]
    loader = PromptBatchIterator(records, batch_size=4, seed=1, shard_index=0, shard_count=1)
    epochs = [sum(_take(loader, 3), []) for _ in range(3)]
    assert all(sorted(epoch) == sorted(r["id"] for r in records) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # reshuffled each epoch
    same_seed = PromptBatchIterator(records, batch_size=4, seed=1, shard_index=0, shard_count=1)
    assert sum(_take(same_seed, 3), []) == epochs[0]
    other_seed = PromptBatchIterator(records, batch_size=4, seed=2, shard_index=0, shard_count=1)
    assert sum(_take(other_seed, 3), []) != epochs[0]
    unshuffled = PromptBatchIterator(records, batch_size=4, shuffle=False, shard_index=0, shard_count=1)
    assert sum(_take(unshuffled, 3), []) == [r["id"] for r in records]


def test_host_shards_partition_every_epoch():
    records = RECORDS[:18]  # 18 records, 3 hosts x 2 prompts: 3 global batches per epoch
    hosts = [
        PromptBatchIterator(records, batch_size=2, seed=3, num_epochs=2, shard_index=h, shard_count=3)
        for h in range(3)
    ]
    per_host = [[_ids(b) for b in host] for host in hosts]
    assert [len(batches) for batches in per_host] == [6, 6, 6]  # every host steps the same number of times
    for epoch in range(2):
        seen = [i for batches in per_host for batch in batches[3 * epoch : 3 * epoch + 3] for i in batch]
        assert Counter(seen) == Counter(r["id"] for r in records)  # disjoint, and together complete
    # The global stream does not depend on the host count: one host with 3x the batch sees the same data.
    single = PromptBatchIterator(records, batch_size=6, seed=3, num_epochs=2, shard_index=0, shard_count=1)
    merged = [sum((per_host[h][k] for h in range(3)), []) for k in range(6)]
    assert [_ids(b) for b in single] == merged


def test_default_shard_is_this_jax_process():
    loader = PromptBatchIterator(RECORDS, batch_size=4, seed=0)
    assert loader.get_state()["config"]["shard_index"] == 0
    assert loader.get_state()["config"]["shard_count"] == 1


def test_restoring_state_from_a_differently_configured_loader_is_refused():
    state = _loader().get_state()
    with pytest.raises(ValueError, match="batch_size: saved 4 vs now 5"):
        _loader(batch_size=5).set_state(state)


def test_loader_reads_tfds_data_source_like_the_in_memory_list(tmp_path):
    config = ToyArithmeticConfig(seed=2, num_train=30, num_heldout=4)
    source = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=config)
    in_memory = generate_toy_arithmetic(config)["train"]
    from_tfds = PromptBatchIterator(source, batch_size=8, seed=11, shard_index=0, shard_count=1)
    from_list = PromptBatchIterator(in_memory, batch_size=8, seed=11, shard_index=0, shard_count=1)
    for _ in range(5):
        assert next(from_tfds) == next(from_list)


def test_loader_rejects_inputs_that_cannot_make_a_batch():
    with pytest.raises(ValueError, match="empty"):
        PromptBatchIterator([], batch_size=2, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        PromptBatchIterator(RECORDS[:3], batch_size=2, num_epochs=1, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        PromptBatchIterator(RECORDS, batch_size=2, shard_index=2, shard_count=2)
