"""TFDS builders (array_record, no TensorFlow) and the build-once cache that training reads.

The builders never download: the caller passes the source (a parquet / JSONL file or folder, or the
toy settings) and a `data_dir` cache. Every builder's config name ends in a hash of everything its
records depend on (the source files' names and bytes, the prompt template's text, the toy knobs),
so a changed source or setting gets a fresh folder and a stale cache is never read. tfds 4.9.10
writes array_record shards and reads them back through `builder.as_data_source()` with numpy-only
deserialisation, so TensorFlow is never imported.

A cache folder `<data_dir>/<name>/<config>/<version>/` counts as built only when it holds
`cache_complete.json`, written after TFDS has finished and listing every file with its size. A build
killed half-way, a half-copied folder or a truncated shard is therefore detected and rebuilt (TFDS
itself builds into a temporary folder and renames it, which is atomic on a local disk but not on
GCS, where a "rename" copies object by object).
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from data_pipeline.records import DataError, PromptRecord, PromptTemplate, get_template
from data_pipeline.sources import load_prompt_records, source_files, source_format
from data_pipeline.toy_arithmetic import TOY_SPLITS, ToyArithmeticConfig, generate_toy_arithmetic

log = logging.getLogger(__name__)

_FILE_FORMAT = "array_record"
COMPLETE_MARKER = "cache_complete.json"
_HASH_CHUNK = 1 << 20


def record_features() -> tfds.features.FeaturesDict:
    """The TFDS feature spec of a PromptRecord; `extra` is free-form, so it is stored as JSON text."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "data_source": tfds.features.Text(),
            "prompt": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
            "ground_truth": tfds.features.Text(),
            "extra": tfds.features.Text(),
        }
    )


def encode_record(record: PromptRecord) -> dict[str, Any]:
    """PromptRecord -> TFDS example dict (`extra` keeps its key order, so records round-trip exactly)."""
    return {
        "id": record["id"],
        "data_source": record["data_source"],
        "prompt": [{"role": m["role"], "content": m["content"]} for m in record["prompt"]],
        "ground_truth": record["ground_truth"],
        "extra": json.dumps(record["extra"]),
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(example: dict[str, Any]) -> PromptRecord:
    """TFDS example as read by a data source (bytes, dict of lists) -> PromptRecord."""
    prompt = example["prompt"]
    return {
        "id": _text(example["id"]),
        "data_source": _text(example["data_source"]),
        "prompt": [{"role": _text(r), "content": _text(c)} for r, c in zip(prompt["role"], prompt["content"])],
        "ground_truth": _text(example["ground_truth"]),
        "extra": json.loads(_text(example["extra"])),
    }


class _PromptRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: one PromptRecord per example, written in source order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PromptRecords: id, data_source, prompt messages, ground_truth, extra (JSON)."}
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS derives this from importlib.resources, which fails when the package is imported as a
        # namespace package (setuptools editable installs run from outside the repo).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # disable_shuffling keeps example i == record i of the loader (readable, reproducible indices).
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=record_features(), disable_shuffling=True
        )

    @abc.abstractmethod
    def _split_records(self) -> dict[str, list[PromptRecord]]:
        """The records of every split, by split name."""

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        return {split: self._generate_examples(records) for split, records in self._split_records().items()}

    def _generate_examples(self, records: list[PromptRecord]) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, record in enumerate(records):
            yield i, encode_record(record)


def _file_sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _config_name(stem: str, key: dict[str, Any]) -> str:
    """`<stem>_<12 hex digits of the key's hash>`, lower-case alphanumerics and underscores only."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "data"
    return f"{stem}_{digest}"


def source_builder_config(
    source_path: epath.PathLike, template: str | PromptTemplate = "dapo"
) -> tfds.core.BuilderConfig:
    """A BuilderConfig named after a hash of the source's file names and bytes (and, for JSONL, the
    template text), so an edited, replaced or re-templated source never reuses an old cache.

    The bytes are hashed rather than size + mtime: hosts that hold their own copy of the data (with
    their own mtimes) still agree on the name, and hashing 2 MB takes milliseconds.
    """
    path = epath.Path(source_path)
    fmt = source_format(path)
    key = {
        "source_name": path.name,  # the file stem becomes the records' id prefix and data_source
        "format": fmt,
        "files": [[f.name, _file_sha256(f)] for f in source_files(path)],
        "template": dataclasses.asdict(get_template(template)) if fmt == "jsonl" else None,
    }
    description = {"source": str(path), "format": fmt, "template": key["template"]}
    return tfds.core.BuilderConfig(
        name=_config_name(path.name.split(".")[0], key), description=json.dumps(description, sort_keys=True)
    )


class _SourceFileBuilder(_PromptRecordBuilder, skip_registration=True):
    """One split read from a parquet / JSONL file or folder given at construction (never downloaded)."""

    SPLIT = "train"

    def __init__(
        self, *, source_path: epath.PathLike, template: str | PromptTemplate = "dapo", **kwargs: Any
    ):
        self._source_path = epath.Path(source_path)
        self._template = template
        kwargs.setdefault("config", source_builder_config(source_path, template))
        super().__init__(**kwargs)

    def _split_records(self) -> dict[str, list[PromptRecord]]:
        records, _ = load_prompt_records(self._source_path, template=self._template)
        if not records:
            raise DataError(f"{self._source_path} has no usable rows (empty, or every row malformed: the "
                            "log above lists the skipped rows); fix the file or point the config at "
                            "another one")
        return {self.SPLIT: records}


class DapoMath17k(_SourceFileBuilder):
    """DAPO-Math-17k, de-duplicated (17,290 problems from the 17,917-row parquet)."""

    name = "dapo_math_17k"
    SPLIT = "train"
    DESCRIPTION = "DAPO-Math-17k training prompts (DAPO template), de-duplicated by prompt."


class Aime2024(_SourceFileBuilder):
    """AIME 2024 as shipped by the DAPO authors, de-duplicated (30 problems from 960 rows)."""

    name = "aime_2024"
    SPLIT = "test"
    DESCRIPTION = "AIME 2024 evaluation prompts (DAPO template), one row per problem."


class PromptFile(_SourceFileBuilder):
    """Any other DAPO-schema parquet or `{id, problem, answer}` JSONL file or folder, whole, as "train"."""

    name = "prompt_file"
    SPLIT = "train"  # the TFDS convention for a dataset with a single split, whatever it is used for
    DESCRIPTION = "Prompts from a local DAPO-schema parquet or {id, problem, answer} JSONL source."


def toy_builder_config(config: ToyArithmeticConfig) -> tfds.core.BuilderConfig:
    """A BuilderConfig named after a hash of the knobs and the template's text, so each distinct toy
    set gets its own cache folder."""
    knobs = dataclasses.asdict(config)
    if not knobs["kinds"]:  # configs without kinds keep the cache names they had before it existed
        del knobs["kinds"]
    key = {**knobs, "template_text": dataclasses.asdict(get_template(config.template))}
    return tfds.core.BuilderConfig(
        name=_config_name(f"seed{config.seed}", key), description=json.dumps(knobs, sort_keys=True)
    )


class ToyArithmetic(_PromptRecordBuilder):
    """The synthetic arithmetic task ("train" / "heldout") for the CPU demo."""

    name = "toy_arithmetic"
    DESCRIPTION = "Seeded synthetic arithmetic problems in the DAPO prompt style."

    def __init__(self, *, toy_config: ToyArithmeticConfig | None = None, **kwargs: Any):
        self._toy_config = toy_config or ToyArithmeticConfig()
        kwargs.setdefault("config", toy_builder_config(self._toy_config))
        super().__init__(**kwargs)

    def _split_records(self) -> dict[str, list[PromptRecord]]:
        splits = generate_toy_arithmetic(self._toy_config)
        return {split: splits[split] for split in TOY_SPLITS}


_BUILDERS: dict[str, type[_PromptRecordBuilder]] = {
    b.name: b for b in (DapoMath17k, Aime2024, PromptFile, ToyArithmetic)
}


@dataclasses.dataclass(frozen=True)
class _Variant:
    """A builder class with its config: where its cache lives and how to construct it."""

    cls: type[_PromptRecordBuilder]
    config: tfds.core.BuilderConfig
    kwargs: dict[str, Any]

    def cache_dir(self, data_dir: epath.PathLike) -> epath.Path:
        return epath.Path(data_dir) / self.cls.name / self.config.name / str(self.cls.VERSION)

    def builder(self, data_dir: epath.PathLike) -> tfds.core.DatasetBuilder:
        with _quiet_custom_config():
            return self.cls(data_dir=epath.Path(data_dir), file_format=_FILE_FORMAT,
                            config=self.config, **self.kwargs)


class _CustomConfigFilter(logging.Filter):
    """Drops TFDS's "Using custom data configuration" warning: every config here is custom (it is
    named by a hash of its source), so the warning would print on every load and say nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration" not in record.getMessage()


@contextlib.contextmanager
def _quiet_custom_config():
    absl_logger = logging.getLogger("absl")
    flt = _CustomConfigFilter()
    absl_logger.addFilter(flt)
    try:
        yield
    finally:
        absl_logger.removeFilter(flt)


def _variant(
    name: str,
    source_path: epath.PathLike | None,
    toy_config: ToyArithmeticConfig | None,
    template: str | PromptTemplate,
) -> _Variant:
    if name not in _BUILDERS:
        raise DataError(f"unknown dataset {name!r}; use one of {sorted(_BUILDERS)}")
    if name == ToyArithmetic.name:
        if source_path is not None:
            raise ValueError(f"{name!r} is generated from toy_config; source_path does not apply")
        toy_config = toy_config or ToyArithmeticConfig()
        return _Variant(ToyArithmetic, toy_builder_config(toy_config), {"toy_config": toy_config})
    if toy_config is not None:
        raise ValueError(f"toy_config only applies to {ToyArithmetic.name!r}, not {name!r}")
    if source_path is None:
        raise ValueError(
            f"{name!r} is built from a local parquet/JSONL file or folder and never downloads: pass "
            "source_path=<file or folder> (it also names the cache, by a hash of the file's bytes)"
        )
    config = source_builder_config(source_path, template)
    return _Variant(_BUILDERS[name], config, {"source_path": source_path, "template": template})


def make_builder(
    name: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
    template: str | PromptTemplate = "dapo",
) -> tfds.core.DatasetBuilder:
    """The builder for `name` ("dapo_math_17k", "aime_2024", "prompt_file", "toy_arithmetic") writing
    array_record into data_dir. `template` wraps JSONL problems (parquet prompts are already wrapped)."""
    return _variant(name, source_path, toy_config, template).builder(data_dir)


def tfds_cache_dir(
    name: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
    template: str | PromptTemplate = "dapo",
) -> epath.Path:
    """The folder this dataset variant is cached in: `<data_dir>/<name>/<config>/<version>`."""
    return _variant(name, source_path, toy_config, template).cache_dir(data_dir)


def cache_problem(cache_dir: epath.PathLike) -> str | None:
    """Why `cache_dir` is not a complete cache ("not built", a missing or truncated file), or None."""
    cache_dir = epath.Path(cache_dir)
    marker = cache_dir / COMPLETE_MARKER
    if not marker.exists():
        return "not built" if not cache_dir.exists() else f"no {COMPLETE_MARKER}: the build did not finish"
    try:
        files = json.loads(marker.read_text())["files"]
        expected = {str(name): int(size) for name, size in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{marker} is unreadable ({e})"
    for name, size in expected.items():
        path = cache_dir / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().length != size:
            return f"{name} has {path.stat().length} bytes, {size} were written"
    return None


def _mark_complete(builder: tfds.core.DatasetBuilder) -> None:
    """Writes the completion marker last: every file of the finished build with its size."""
    cache_dir = builder.data_path
    files = {f.name: f.stat().length for f in sorted(cache_dir.iterdir()) if f.name != COMPLETE_MARKER}
    splits = {name: split.num_examples for name, split in builder.info.splits.items()}
    payload = {"files": files, "num_examples": splits, "config": builder.builder_config.description}
    tmp = cache_dir / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.rename(cache_dir / COMPLETE_MARKER)


def build_tfds_dataset(
    name: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
    template: str | PromptTemplate = "dapo",
) -> tfds.core.DatasetBuilder:
    """Builds the dataset into data_dir unless a complete cache is there (then it is reused untouched).

    An incomplete or damaged cache folder (see `cache_problem`) is deleted and built again. Call it
    from one process at a time: in multi-host training process 0 builds, the others wait.
    """
    return _built(_variant(name, source_path, toy_config, template), data_dir)


def _built(variant: _Variant, data_dir: epath.PathLike) -> tfds.core.DatasetBuilder:
    cache_dir = variant.cache_dir(data_dir)
    problem = cache_problem(cache_dir)
    if problem is None:
        log.info("reusing the TFDS cache %s", cache_dir)
        return variant.builder(data_dir)
    if cache_dir.exists():
        log.warning("TFDS cache %s is incomplete (%s); deleting and rebuilding it", cache_dir, problem)
        cache_dir.rmtree()
    builder = variant.builder(data_dir)
    builder.download_and_prepare(file_format=_FILE_FORMAT)
    _mark_complete(builder)
    log.info("built the TFDS cache %s", cache_dir)
    return builder


class RecordDataSource(Sequence):
    """Random-access PromptRecords over a TFDS array_record data source (what grain's MapDataset reads).

    `source[i]` decodes one record; slices and iteration read in batches and return/yield records,
    so code written for a list of records (`records[:n]`, `for r in records`) works unchanged.
    """

    _READ_CHUNK = 1024

    def __init__(self, data_source: Sequence[dict[str, Any]]):
        self._data_source = data_source

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int | slice) -> Any:  # PromptRecord, or a list of them for a slice
        if isinstance(index, slice):
            return self._read(range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_example(self._data_source[index % len(self)])

    def __iter__(self) -> Iterator[PromptRecord]:
        for start in range(0, len(self), self._READ_CHUNK):
            yield from self._read(range(start, min(start + self._READ_CHUNK, len(self))))

    def _read(self, indices: Iterable[int]) -> list[PromptRecord]:
        indices = list(indices)
        read_many = getattr(self._data_source, "__getitems__", None)
        raw = read_many(indices) if read_many is not None and indices else [self._data_source[i] for i in indices]
        return [decode_example(example) for example in raw]

    def __repr__(self) -> str:
        return f"RecordDataSource({self._data_source!r})"


def load_tfds_records(
    name: str,
    split: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
    template: str | PromptTemplate = "dapo",
    build: bool = True,
) -> RecordDataSource:
    """The split as a random-access source of PromptRecords read from the array_record cache.

    `build=True` builds the cache first if needed; `build=False` only reads (the other hosts of a
    multi-host run, after process 0 has built) and raises if the cache is not complete.
    """
    variant = _variant(name, source_path, toy_config, template)
    if build:
        builder = _built(variant, data_dir)
    else:
        cache_dir = variant.cache_dir(data_dir)
        problem = cache_problem(cache_dir)
        if problem is not None:
            raise FileNotFoundError(
                f"no complete TFDS cache at {cache_dir} ({problem}). Process 0 builds it before the "
                "others read it: if its build failed, its log says why; otherwise check that the cache "
                "folder (data.cache_dir, default <workdir>/tfds) is on storage every host shares"
            )
        builder = variant.builder(data_dir)
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"{name} has splits {sorted(splits)}; got split={split!r}")
    return RecordDataSource(builder.as_data_source(split=split))
