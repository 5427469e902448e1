"""TFDS builders (array_record, no TensorFlow) for DAPO-Math-17k, AIME 2024 and the toy arithmetic set.

The builders never download: the caller passes the parquet path (or the toy config) and a
`data_dir` cache. tfds 4.9.10 writes array_record shards and reads them back with
`tfds.data_source` / `builder.as_data_source()` through numpy-only deserialisation, so
TensorFlow is never imported.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from data_pipeline.records import PromptRecord
from data_pipeline.sources import load_dapo_parquet
from data_pipeline.toy_arithmetic import TOY_SPLITS, ToyArithmeticConfig, generate_toy_arithmetic

_FILE_FORMAT = "array_record"


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
    """PromptRecord -> TFDS example dict."""
    return {
        "id": record["id"],
        "data_source": record["data_source"],
        "prompt": [{"role": m["role"], "content": m["content"]} for m in record["prompt"]],
        "ground_truth": record["ground_truth"],
        "extra": json.dumps(record["extra"], sort_keys=True),
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


class _ParquetBuilder(_PromptRecordBuilder, skip_registration=True):
    """Builds one split from a DAPO-schema parquet file given at construction (never downloaded)."""

    SPLIT = "train"

    def __init__(self, *, source_path: epath.PathLike | None = None, **kwargs: Any):
        self._source_path = source_path
        super().__init__(**kwargs)

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Builds from `source_path` unless the cache is already there (then a no-op)."""
        if self._source_path is None and not self.is_prepared():
            raise ValueError(
                f"{self.name} is not built under {self.data_dir_root}; pass source_path=<parquet file or "
                "folder> to build it (this builder never downloads)"
            )
        super().download_and_prepare(*args, **kwargs)

    def _split_records(self) -> dict[str, list[PromptRecord]]:
        records, _ = load_dapo_parquet(self._source_path)
        return {self.SPLIT: records}


class DapoMath17k(_ParquetBuilder):
    """DAPO-Math-17k, de-duplicated (17,290 problems from the 17,917-row parquet)."""

    name = "dapo_math_17k"
    SPLIT = "train"
    DESCRIPTION = "DAPO-Math-17k training prompts (DAPO template), de-duplicated by prompt."


class Aime2024(_ParquetBuilder):
    """AIME 2024 as shipped by the DAPO authors, de-duplicated (30 problems from 960 rows)."""

    name = "aime_2024"
    SPLIT = "test"
    DESCRIPTION = "AIME 2024 evaluation prompts (DAPO template), one row per problem."


def toy_builder_config(config: ToyArithmeticConfig) -> tfds.core.BuilderConfig:
    """A BuilderConfig named after a hash of the knobs, so each distinct toy set gets its own cache folder."""
    knobs = json.dumps(dataclasses.asdict(config), sort_keys=True)
    digest = hashlib.sha256(knobs.encode()).hexdigest()[:10]
    return tfds.core.BuilderConfig(name=f"seed{config.seed}_{digest}", description=knobs)


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


_BUILDERS: dict[str, type[_PromptRecordBuilder]] = {b.name: b for b in (DapoMath17k, Aime2024, ToyArithmetic)}


def make_builder(
    name: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
) -> tfds.core.DatasetBuilder:
    """The builder for `name` ("dapo_math_17k", "aime_2024", "toy_arithmetic") writing array_record into data_dir."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(_BUILDERS)}")
    kwargs: dict[str, Any] = {"data_dir": epath.Path(data_dir), "file_format": _FILE_FORMAT}
    if name == ToyArithmetic.name:
        return ToyArithmetic(toy_config=toy_config, **kwargs)
    if toy_config is not None:
        raise ValueError(f"toy_config only applies to {ToyArithmetic.name!r}, not {name!r}")
    return _BUILDERS[name](source_path=source_path, **kwargs)


def build_tfds_dataset(
    name: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset into data_dir unless already there (then the cache is reused untouched)."""
    builder = make_builder(name, data_dir=data_dir, source_path=source_path, toy_config=toy_config)
    builder.download_and_prepare(file_format=_FILE_FORMAT)
    return builder


class RecordDataSource(Sequence):
    """Random-access PromptRecords over a TFDS array_record data source (what grain's MapDataset reads)."""

    def __init__(self, data_source: Sequence[dict[str, Any]]):
        self._data_source = data_source

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> PromptRecord:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_example(self._data_source[index % len(self)])

    def __repr__(self) -> str:
        return f"RecordDataSource({self._data_source!r})"


def load_tfds_records(
    name: str,
    split: str,
    *,
    data_dir: epath.PathLike,
    source_path: epath.PathLike | None = None,
    toy_config: ToyArithmeticConfig | None = None,
) -> RecordDataSource:
    """Builds if needed, then returns the split as a random-access source of PromptRecords."""
    builder = build_tfds_dataset(name, data_dir=data_dir, source_path=source_path, toy_config=toy_config)
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"{name} has splits {sorted(splits)}; got split={split!r}")
    return RecordDataSource(builder.as_data_source(split=split))
