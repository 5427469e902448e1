"""TFDS builders write array_record and read back with no TensorFlow; training reads every dataset
through that cache: built once, reused, rebuilt when the source or settings change or a build died."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

import data_pipeline as dp
from configs import toy as toy_config_file
from data_pipeline import (
    PromptBatchIterator,
    RecordDataSource,
    ToyArithmeticConfig,
    build_tfds_dataset,
    cache_problem,
    decode_example,
    generate_toy_arithmetic,
    load_prompt_records,
    load_tfds_records,
    make_builder,
    tfds_builders,
    tfds_cache_dir,
)
from data_pipeline import datasets
from tests.conftest import REPO_ROOT

TOY = ToyArithmeticConfig(seed=5, num_train=60, num_heldout=8)


def _tensorflow_imported() -> bool:
    return any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)


def _exact(records) -> list[str]:
    """Order-sensitive view (dict key order included): equal lists of these mean identical records."""
    return [json.dumps(r) for r in records]


def _mtimes(folder) -> dict[str, int]:
    return {p.name: os.stat(p).st_mtime_ns for p in folder.iterdir()}


def _array_record_files(folder) -> list:
    return sorted(p for p in folder.rglob("*.array_record-*") if "incomplete" not in str(p))


def _config(**toy):
    c = toy_config_file.get_config()
    c.data.toy.num_train = 40
    c.data.toy.num_heldout = 6
    c.data.toy.update(toy)
    return c


# ------------------------------------------------------------------------------------- builders
def test_aime_2024_builds_to_array_record_and_reads_back_without_tensorflow(shared_data, tmp_path):
    assert not _tensorflow_imported()
    parquet = shared_data / "aime-2024.parquet"
    builder = build_tfds_dataset("aime_2024", data_dir=tmp_path, source_path=parquet)
    cache = tfds_cache_dir("aime_2024", data_dir=tmp_path, source_path=parquet)
    assert cache.parent.parent == tmp_path / "aime_2024" and cache.name == "1.0.0"
    assert list(cache.glob("aime_2024-test.array_record-*"))
    # Plain TFDS reads it by name (the config name is the source's stem plus a hash of its bytes).
    source = tfds.data_source(f"aime_2024/{builder.builder_config.name}", split="test", data_dir=tmp_path,
                              download=False)
    records = [decode_example(source[i]) for i in range(len(source))]
    jsonl = [json.loads(line) for line in (shared_data / "aime2024.jsonl").read_text().splitlines()]
    assert len(records) == 30
    assert {(r["extra"]["index"], r["ground_truth"]) for r in records} == {
        (row["dapo_index"], str(row["answer"])) for row in jsonl
    }
    assert {r["extra"]["raw_problem"] for r in records} == {row["problem"] for row in jsonl}
    assert all(r["prompt"][0]["role"] == "user" for r in records)
    assert not _tensorflow_imported()


def test_building_twice_reuses_the_cache_without_reading_the_source(shared_data, tmp_path, monkeypatch):
    parquet = tmp_path / "copy.parquet"
    shutil.copy(shared_data / "aime-2024.parquet", parquet)
    first = load_tfds_records("aime_2024", "test", data_dir=tmp_path / "cache", source_path=parquet)
    cache = tfds_cache_dir("aime_2024", data_dir=tmp_path / "cache", source_path=parquet)
    written = _mtimes(cache)
    monkeypatch.setattr(tfds_builders, "load_prompt_records", lambda *a, **k: pytest.fail("rebuilt"))
    os.utime(parquet)  # a new mtime alone is no change: the key is the file's bytes
    second = load_tfds_records("aime_2024", "test", data_dir=tmp_path / "cache", source_path=parquet)
    assert _mtimes(cache) == written
    assert _exact(second) == _exact(first)


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


def test_record_data_source_slices_and_iterates_like_the_list(tmp_path):
    source = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=TOY)
    expected = generate_toy_arithmetic(TOY)["train"]
    assert isinstance(source, RecordDataSource) and len(source) == 60
    assert source[:7] == expected[:7] and source[50:200] == expected[50:] and source[::-9] == expected[::-9]
    assert source[-1] == expected[-1] and _exact(source) == _exact(expected)
    with pytest.raises(IndexError):
        source[60]


def test_unbuilt_or_unknown_datasets_say_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError, match="never downloads: pass source_path"):
        build_tfds_dataset("dapo_math_17k", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_builder("gsm8k", data_dir=tmp_path)
    with pytest.raises(ValueError, match="splits"):
        load_tfds_records("toy_arithmetic", "validation", data_dir=tmp_path, toy_config=TOY)
    with pytest.raises(FileNotFoundError, match=r"no complete TFDS cache .* \(not built\)"):
        load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path / "empty", toy_config=TOY, build=False)


# --------------------------------------------------------------------- the cache training reads
@pytest.mark.parametrize("spec,split", [("toy", "train"), ("toy", "val"), ("aime2024", "val"),
                                        ("aime-2024", "val"), ("math500", "val"),
                                        ("dapo-math-17k", "train")])
def test_records_from_the_cache_equal_the_source_records_in_order(spec, split, shared_data, tmp_path):
    c = _config()
    c.data.template = "dapo"
    records = datasets.load_records(spec, c, split=split, cache_dir=tmp_path)
    # What training read before the cache existed: the readers / the generator, straight from the source.
    if spec == "toy":
        expected = generate_toy_arithmetic(datasets.toy_config(c))["train" if split == "train" else "heldout"]
    else:
        expected, _ = load_prompt_records(shared_data / datasets.KNOWN_FILES[spec], template="dapo")
    assert isinstance(records, RecordDataSource) and len(records) == len(expected)
    assert _exact(records) == _exact(expected)
    assert _array_record_files(tmp_path)


def test_batches_and_checkpointed_positions_are_the_same_over_the_cache(shared_data, tmp_path):
    """Same seed, same batches as the in-memory list (across an epoch), and an iterator state saved
    over the list (a checkpoint from before the cache) resumes over the cache exactly."""
    c = _config()  # 40 toy records: 12 batches of 7 run into the third epoch
    for spec, batch, steps in [("toy", 7, 12), ("dapo-math-17k", 64, 5)]:
        cached = datasets.load_records(spec, c, split="train", cache_dir=tmp_path)
        if spec == "toy":
            in_memory = generate_toy_arithmetic(datasets.toy_config(c))["train"]
        else:
            in_memory, _ = load_prompt_records(shared_data / "dapo-math-17k.parquet")
        make = lambda src: PromptBatchIterator(src, batch_size=batch, seed=3, shard_index=0, shard_count=1)
        old, new = make(in_memory), make(cached)
        assert [_exact(next(new)) for _ in range(steps)] == [_exact(next(old)) for _ in range(steps)]
        resumed = make(cached)
        resumed.set_state(json.loads(json.dumps(old.get_state())))
        assert [_exact(next(resumed)) for _ in range(3)] == [_exact(next(old)) for _ in range(3)]


def test_second_load_reuses_the_cache_and_reads_no_source(tmp_path, monkeypatch):
    c = _config()
    first = datasets.load_records("toy", c, split="train", cache_dir=tmp_path)
    cache = tfds_cache_dir("toy_arithmetic", data_dir=tmp_path, toy_config=datasets.toy_config(c))
    written = _mtimes(cache)
    monkeypatch.setattr(tfds_builders, "generate_toy_arithmetic", lambda *a: pytest.fail("rebuilt"))
    second = datasets.load_records("toy", c, split="train", cache_dir=tmp_path)
    assert _mtimes(cache) == written
    assert _exact(second) == _exact(first)
    assert [p.name for p in (tmp_path / "toy_arithmetic").iterdir()] == [cache.parent.name]


def test_a_changed_source_file_is_rebuilt_never_read_stale(shared_data, tmp_path):
    c = _config()
    source = tmp_path / "problems.jsonl"
    shutil.copy(shared_data / "aime2024.jsonl", source)
    before = datasets.load_records(str(source), c, split="val", cache_dir=tmp_path / "cache")
    lines = source.read_text().splitlines()
    row = json.loads(lines[0])
    row["answer"] = 12345
    stat = source.stat()
    source.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: only the bytes changed
    after = datasets.load_records(str(source), c, split="val", cache_dir=tmp_path / "cache")
    assert before[0]["ground_truth"] != "12345" and after[0]["ground_truth"] == "12345"
    assert _exact(after[1:]) == _exact(before[1:])
    assert len(list((tmp_path / "cache" / "prompt_file").iterdir())) == 2


def test_changed_toy_settings_or_template_build_a_new_cache(shared_data, tmp_path):
    c = _config()
    base = list(datasets.load_records("toy", c, split="train", cache_dir=tmp_path))
    more = datasets.load_records("toy", _config(num_train=41), split="train", cache_dir=tmp_path)
    assert len(more) == 41
    dapo = _config()
    dapo.data.template = "dapo"
    wrapped = datasets.load_records("toy", dapo, split="train", cache_dir=tmp_path)
    assert wrapped[0]["prompt"][0]["content"].startswith("Solve the following math problem")
    assert not base[0]["prompt"][0]["content"].startswith("Solve the following math problem")
    assert len(list((tmp_path / "toy_arithmetic").iterdir())) == 3
    # JSONL problems are wrapped by data.template too, so the template is part of their key.
    short = datasets.load_records("aime2024", c, split="val", cache_dir=tmp_path)
    long = datasets.load_records("aime2024", dapo, split="val", cache_dir=tmp_path)
    assert short[0]["prompt"] != long[0]["prompt"] and short[0]["ground_truth"] == long[0]["ground_truth"]
    assert len(list((tmp_path / "prompt_file").iterdir())) == 2


def test_cache_dir_is_the_configured_folder_else_tfds_in_the_workdir(tmp_path):
    c = _config()
    assert datasets.cache_dir(c, tmp_path / "run") == tmp_path / "run" / "tfds"
    c.data.cache_dir = str(tmp_path / "shared")
    assert datasets.cache_dir(c, tmp_path / "run") == tmp_path / "shared"
    with pytest.raises(ValueError, match="split='test'"):
        datasets.load_records("toy", c, split="test", cache_dir=tmp_path)


# ---------------------------------------------------------------------- interrupted / corrupt builds
_KILLED_BUILD = textwrap.dedent("""
    import pathlib, sys, time
    from data_pipeline import ToyArithmeticConfig, build_tfds_dataset, tfds_builders
    generate = tfds_builders._PromptRecordBuilder._generate_examples
    def slow(self, records):  # the train split is written; die while generating the held-out one
        for i, example in enumerate(generate(self, records)):
            if records[0]["extra"]["split"] == "heldout" and i == 3:
                pathlib.Path(sys.argv[2]).write_text("writing")
                time.sleep(600)
            yield example
    tfds_builders._PromptRecordBuilder._generate_examples = slow
    config = ToyArithmeticConfig(seed=5, num_train=60, num_heldout=8)  # TOY
    build_tfds_dataset("toy_arithmetic", data_dir=sys.argv[1], toy_config=config)
""")


def test_a_build_killed_half_way_is_not_read_and_is_rebuilt(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "cache"), str(ready)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the build never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list((tmp_path / "cache" / "toy_arithmetic").rglob("*train.array_record-*"))  # it was mid-build
    cache = tfds_cache_dir("toy_arithmetic", data_dir=tmp_path / "cache", toy_config=TOY)
    assert cache_problem(cache) is not None
    with pytest.raises(FileNotFoundError, match="no complete TFDS cache"):
        load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path / "cache", toy_config=TOY, build=False)
    rebuilt = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path / "cache", toy_config=TOY)
    assert _exact(rebuilt) == _exact(generate_toy_arithmetic(TOY)["train"])
    assert cache_problem(cache) is None


@pytest.mark.parametrize("damage", ["no_marker", "truncated_shard", "missing_shard", "bad_marker"])
def test_a_half_written_or_damaged_cache_is_rebuilt(tmp_path, damage):
    """A folder with files but no completion marker (a GCS "rename" cut off, or a kill between the
    rename and the marker), a truncated or missing shard, or an unreadable marker."""
    build_tfds_dataset("toy_arithmetic", data_dir=tmp_path, toy_config=TOY)
    cache = tfds_cache_dir("toy_arithmetic", data_dir=tmp_path, toy_config=TOY)
    shard = next(cache.glob("toy_arithmetic-train.array_record-*"))
    marker = cache / tfds_builders.COMPLETE_MARKER
    if damage == "no_marker":
        marker.unlink()
    elif damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "missing_shard":
        shard.unlink()
    else:
        marker.write_text("{not json")
    assert cache_problem(cache) is not None
    with pytest.raises(FileNotFoundError, match="no complete TFDS cache"):
        load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=TOY, build=False)
    records = load_tfds_records("toy_arithmetic", "train", data_dir=tmp_path, toy_config=TOY)
    assert _exact(records) == _exact(generate_toy_arithmetic(TOY)["train"])
    assert cache_problem(cache) is None


# --------------------------------------------------------------------------------------- multi-host
def test_only_process_0_builds_and_every_process_reads_after_the_barrier(tmp_path, monkeypatch):
    """Two processes, faked in turn: process 0 builds then waits; process 1 only waits and reads."""
    c = _config()
    events = []
    real_build = dp.build_tfds_dataset
    monkeypatch.setattr(dp, "build_tfds_dataset", lambda *a, **k: (events.append("build"), real_build(*a, **k)))
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append(name))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(FileNotFoundError, match="Process 0 builds it .* on storage every host shares"):
        datasets.load_records("toy", c, split="train", cache_dir=tmp_path)  # nothing built yet
    assert not list(tmp_path.rglob("*.array_record-*"))
    barrier = events.pop()
    assert barrier.startswith("data_pipeline: TFDS cache toy_arithmetic/seed0_") and events == []

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    on_0 = datasets.load_records("toy", c, split="train", cache_dir=tmp_path)
    assert events == ["build", barrier]  # built before the barrier, same barrier name on every host
    cache = tfds_cache_dir("toy_arithmetic", data_dir=tmp_path, toy_config=datasets.toy_config(c))
    written = _mtimes(cache)

    events.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(tfds_builders, "generate_toy_arithmetic", lambda *a: pytest.fail("process 1 built"))
    on_1 = datasets.load_records("toy", c, split="train", cache_dir=tmp_path)
    assert events == [barrier] and _mtimes(cache) == written
    assert _exact(on_1) == _exact(on_0)


def test_a_failed_build_on_process_0_still_reaches_the_barrier_then_raises(tmp_path, monkeypatch):
    """Otherwise the other processes would wait at the barrier until the distributed timeout."""
    events = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append("barrier"))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    source = tmp_path / "empty.jsonl"
    source.write_text('{"id": 1, "problem": "", "answer": 3}\n')  # no usable row
    with pytest.raises(ValueError, match="no usable rows"):
        datasets.load_records(str(source), _config(), split="val", cache_dir=tmp_path / "cache")
    assert events == ["barrier"]
    assert cache_problem(tfds_cache_dir("prompt_file", data_dir=tmp_path / "cache", source_path=source,
                                        template="short")) is not None


# ------------------------------------------------------------------------------------------ trainer
def test_trainer_reads_train_and_val_records_from_the_workdir_cache_and_a_resume_reuses_it(tmp_path):
    from dapo_jax.training.trainer import Trainer
    from tests.test_trainer import small_config, text_hash_scores

    c = small_config(**{"trainer.total_steps": 1})
    tr = Trainer(c, str(tmp_path), progress=False, reward_fn=text_hash_scores)
    tr.train()
    tr.close()
    tfds_dir = tmp_path / "tfds"
    files = _array_record_files(tfds_dir)
    assert {p.name.split(".")[0] for p in files} == {"toy_arithmetic-train", "toy_arithmetic-heldout"}
    expected = generate_toy_arithmetic(datasets.toy_config(c))
    assert isinstance(tr.train_records, RecordDataSource)
    assert _exact(tr.train_records) == _exact(expected["train"])
    assert _exact(tr.val_sets["toy"]) == _exact(expected["heldout"])
    written = {p: p.stat().st_mtime_ns for p in tfds_dir.rglob("*") if p.is_file()}

    resumed = Trainer(small_config(**{"trainer.total_steps": 2}), str(tmp_path), progress=False,
                      reward_fn=text_hash_scores)
    assert resumed.step == 1
    resumed.close()
    assert {p: p.stat().st_mtime_ns for p in tfds_dir.rglob("*") if p.is_file()} == written


_PROCESS = textwrap.dedent("""
    import json, sys, time
    import jax
    port, index, cache, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    from configs import toy
    from data_pipeline import datasets, tfds_builders
    generate = tfds_builders.generate_toy_arithmetic
    def build(config):
        if index != 0:
            raise AssertionError("process 1 built the cache")
        time.sleep(3)  # a process that did not wait at the barrier would find no cache
        return generate(config)
    tfds_builders.generate_toy_arithmetic = build
    c = toy.get_config()
    c.data.toy.num_train, c.data.toy.num_heldout = 40, 6
    records = datasets.load_records("toy", c, split="train", cache_dir=cache)
    with open(out, "w") as f:
        json.dump(list(records), f)
    jax.distributed.shutdown()
""")


def test_two_real_jax_processes_build_once_and_both_read_the_cache(tmp_path):
    """jax.distributed on localhost: process 0 builds (slowly), process 1 waits at the barrier,
    never builds, and both read the records the generator makes."""
    from scripts import multihost_check as mc

    port, env = mc.free_port(), mc.subprocess_env(1)
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(port), str(i), str(tmp_path / "tfds"),
                               str(tmp_path / f"records_{i}.json")], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    c = _config()
    expected = _exact(generate_toy_arithmetic(datasets.toy_config(c))["train"])
    for i in range(2):
        assert _exact(json.loads((tmp_path / f"records_{i}.json").read_text())) == expected
    assert len(_array_record_files(tmp_path / "tfds")) == 2  # one build: a train and a heldout shard


def test_cache_dir_is_local_per_host_when_the_workdir_is_on_object_storage(tmp_path):
    import os

    from configs import toy
    from data_pipeline import datasets
    c = toy.get_config()
    # A local workdir: <workdir>/tfds, shared by the hosts that share the workdir.
    assert datasets.cache_dir(c, tmp_path) == tmp_path / "tfds"
    assert datasets.cache_is_shared(c, tmp_path)
    # gs://: array_record writes local files only, so every host builds its own local cache.
    assert str(datasets.cache_dir(c, "gs://bucket/run")) == os.path.expanduser(datasets.LOCAL_CACHE)
    assert not datasets.cache_is_shared(c, "gs://bucket/run")
    # A configured data.cache_dir always wins and is taken to be shared.
    c.data.cache_dir = str(tmp_path / "shared")
    assert datasets.cache_dir(c, "gs://bucket/run") == tmp_path / "shared"
    assert datasets.cache_is_shared(c, "gs://bucket/run")
