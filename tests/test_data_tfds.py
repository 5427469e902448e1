"""TFDS builders write array_record and read back through tfds.data_source with no TensorFlow."""
import json
import shutil
import sys

import pytest
import tensorflow_datasets as tfds

from data_pipeline import (
    ToyArithmeticConfig,
    build_tfds_dataset,
    decode_example,
    generate_toy_arithmetic,
    load_tfds_records,
    make_builder,
)

TOY = ToyArithmeticConfig(seed=5, num_train=60, num_heldout=8)


def _tensorflow_imported() -> bool:
    return any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)


def test_aime_2024_builds_to_array_record_and_reads_back_without_tensorflow(shared_data, tmp_path):
    assert not _tensorflow_imported()
    build_tfds_dataset("aime_2024", data_dir=tmp_path, source_path=shared_data / "aime-2024.parquet")
    assert list((tmp_path / "aime_2024" / "1.0.0").glob("aime_2024-test.array_record-*"))
    source = tfds.data_source("aime_2024", split="test", data_dir=tmp_path, download=False)
    records = [decode_example(source[i]) for i in range(len(source))]
    jsonl = [json.loads(line) for line in (shared_data / "aime2024.jsonl").read_text().splitlines()]
    assert len(records) == 30
    assert {(r["extra"]["index"], r["ground_truth"]) for r in records} == {
        (row["dapo_index"], str(row["answer"])) for row in jsonl
    }
    assert {r["extra"]["raw_problem"] for r in records} == {row["problem"] for row in jsonl}
    assert all(r["prompt"][0]["role"] == "user" for r in records)
    assert not _tensorflow_imported()


def test_building_twice_reuses_the_cache_without_reading_the_source(shared_data, tmp_path):
    parquet = tmp_path / "copy.parquet"
    shutil.copy(shared_data / "aime-2024.parquet", parquet)
    first = load_tfds_records("aime_2024", "test", data_dir=tmp_path / "cache", source_path=parquet)
    shard = next((tmp_path / "cache" / "aime_2024" / "1.0.0").glob("*.array_record-*"))
    written = shard.stat().st_mtime_ns
    parquet.unlink()  # a rebuild would now fail: only the cache can answer
    second = load_tfds_records("aime_2024", "test", data_dir=tmp_path / "cache", source_path=parquet)
    assert shard.stat().st_mtime_ns == written
    assert list(second) == list(first)


def test_toy_tfds_splits_equal_the_generator_output(tmp_path):
    expected = generate_toy_arithmetic(TOY)
    builder = build_tfds_dataset("toy_arithmetic", data_dir=tmp_path, toy_config=TOY)
    sources = builder.as_data_source()
    assert set(sources) == {"train", "heldout"}
    for split in ["train", "heldout"]:
        assert [decode_example(ex) for ex in sources[split]] == expected[split]
    # Readable by name too, once built (the config name encodes the knobs).
    by_name = tfds.data_source(
        f"toy_arithmetic/{builder.builder_config.name}", split="heldout", data_dir=tmp_path, download=False
    )
    assert [decode_example(ex) for ex in by_name] == expected["heldout"]
    assert not _tensorflow_imported()


def test_toy_configs_with_different_knobs_get_separate_caches(tmp_path):
    other = ToyArithmeticConfig(seed=6, num_train=60, num_heldout=8)
    a = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=TOY)
    b = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=other)
    assert list(a) == generate_toy_arithmetic(TOY)["train"]
    assert list(b) == generate_toy_arithmetic(other)["train"]
    assert len(list((tmp_path / "toy_arithmetic").iterdir())) == 2


def test_unbuilt_parquet_dataset_without_a_source_path_says_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError, match="not built .* pass source_path"):
        build_tfds_dataset("dapo_math_17k", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_builder("gsm8k", data_dir=tmp_path)
    with pytest.raises(ValueError, match="splits"):
        load_tfds_records("toy_arithmetic", "validation", data_dir=tmp_path, toy_config=TOY)
