"""Readers that turn the DAPO parquet files and the JSONL evaluation sets into PromptRecords."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from data_pipeline.records import (
    LoadStats,
    DataError,
    DataFileNotFound,
    MalformedRow,
    PromptRecord,
    PromptTemplate,
    get_template,
    validate_answer,
    validate_messages,
)

ConflictPolicy = Literal["keep_first", "keep_all", "drop"]
_REQUIRED_PARQUET_COLUMNS = ("prompt", "reward_model")


def _files(path: epath.PathLike, suffix: str) -> list[epath.Path]:
    """One file, or every `*{suffix}` file of a folder in name order (deterministic record order)."""
    path = epath.Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*{suffix}"), key=lambda p: p.name)
        if not files:
            raise DataFileNotFound(f"folder {path} holds no *{suffix} files; pass a file or a folder of them")
        return files
    if not path.exists():
        raise DataFileNotFound(f"{path} does not exist; pass a {suffix} file or a folder of {suffix} files")
    return [path]


def _dataset_name(path: epath.PathLike) -> str:
    """Default id prefix / data_source: the file stem, or the folder name."""
    path = epath.Path(path)
    return path.name if path.is_dir() else path.name.split(".")[0]


def _parquet_rows(path: epath.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (file name, row dict) for every row of a parquet file or folder."""
    for file in _files(path, ".parquet"):
        try:
            with file.open("rb") as f:
                table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file} is not a readable parquet file ({e}); it may be truncated or not "
                            "parquet at all: download it again or point data.train / data.val at another file") from e
        missing = [c for c in _REQUIRED_PARQUET_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(
                f"{file} lacks column(s) {missing}; expected the DAPO schema "
                "(data_source, prompt, ability, reward_model{ground_truth, style}, extra_info)"
            )
        for row in table.to_pylist():
            yield file.name, row


def _record_from_parquet_row(row: dict[str, Any], default_source: str) -> tuple[PromptRecord, Any]:
    """Normalises one upstream DAPO row; returns the record and its upstream index (or None)."""
    messages = validate_messages(row.get("prompt"))
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise MalformedRow(f"reward_model must be a struct with ground_truth, got {type(reward_model).__name__}")
    ground_truth = validate_answer(reward_model.get("ground_truth"), "reward_model.ground_truth")
    data_source = row.get("data_source")
    if data_source is not None and not isinstance(data_source, str):
        raise MalformedRow(f"data_source must be a string, got {type(data_source).__name__}")
    extra_info = row.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        raise MalformedRow(f"extra_info must be a struct, got {type(extra_info).__name__}")
    extra: dict[str, Any] = {k: v for k, v in extra_info.items() if v is not None}
    if row.get("ability") is not None:
        extra["ability"] = row["ability"]
    if reward_model.get("style") is not None:
        extra["reward_style"] = reward_model["style"]
    record: PromptRecord = {
        "id": "",
        "data_source": data_source or default_source,
        "prompt": messages,
        "ground_truth": ground_truth,
        "extra": extra,
    }
    index = extra_info.get("index")
    return record, index if isinstance(index, int) and not isinstance(index, bool) else None


def _collect(
    rows: Iterable[tuple[str, Any]],
    to_record: Any,
    stats: LoadStats,
    *,
    id_prefix: str,
    deduplicate: bool,
    on_conflict: ConflictPolicy,
    verbatim_ids: bool = False,
) -> list[PromptRecord]:
    """Validates, de-duplicates and ids the rows; shared by the parquet and JSONL readers.

    Ids are `<id_prefix>-<upstream id>` (or the upstream id itself with `verbatim_ids`), falling back
    to the row index when a row has no upstream id or its id was already taken.
    """
    if on_conflict not in ("keep_first", "keep_all", "drop"):
        raise ValueError(f"on_conflict={on_conflict!r}; use 'keep_first', 'keep_all' or 'drop'")
    records: list[PromptRecord] = []
    kept_by_prompt: dict[tuple, dict[str, int]] = {}  # prompt key -> {ground truth: position in `records`}
    conflicted: set[tuple] = set()
    used_ids: set[str] = set()
    for row_index, (file_name, row) in enumerate(rows):
        stats.num_rows += 1
        try:
            record, upstream_id = to_record(row)
        except MalformedRow as e:
            stats.skip(row_index, f"{file_name}: {e}")
            continue
        if deduplicate:
            key = tuple((m["role"], m["content"]) for m in record["prompt"])
            kept = kept_by_prompt.setdefault(key, {})
            if record["ground_truth"] in kept:
                stats.num_duplicates += 1
                continue
            if kept and on_conflict != "keep_all":
                first = records[next(iter(kept.values()))]
                stats.conflict(
                    row_index, f"ground truth {record['ground_truth']!r} vs {first['ground_truth']!r} of {first['id']}"
                )
                conflicted.add(key)
                continue
            kept[record["ground_truth"]] = len(records)
        if upstream_id is None:
            record_id = f"{id_prefix}-{row_index}"
        else:
            record_id = str(upstream_id) if verbatim_ids else f"{id_prefix}-{upstream_id}"
        if record_id in used_ids:  # e.g. several files of a folder restart their upstream index at 0
            record_id = f"{id_prefix}-row{row_index}"
        used_ids.add(record_id)
        record["id"] = record_id
        record["extra"]["source_row"] = row_index
        records.append(record)
    if on_conflict == "drop" and conflicted:
        records = [
            r for r in records if tuple((m["role"], m["content"]) for m in r["prompt"]) not in conflicted
        ]
    stats.num_records = len(records)
    stats.log()
    return records


def load_dapo_parquet(
    path: epath.PathLike,
    *,
    deduplicate: bool = True,
    on_conflict: ConflictPolicy = "keep_first",
    id_prefix: str | None = None,
    max_logged: int = 5,
) -> tuple[list[PromptRecord], LoadStats]:
    """Reads DAPO-schema parquet (a file, a folder of files, or gs://) into de-duplicated PromptRecords.

    De-duplication keys on the prompt messages. A repeat with the same ground truth is an exact
    duplicate and is dropped; a repeat with a *different* ground truth is a conflict, resolved by
    `on_conflict`: keep the first occurrence (default), keep every distinct (prompt, answer) pair, or
    drop every copy of the problem.
    """
    name = _dataset_name(path)
    stats = LoadStats(source=str(path), conflict_policy=on_conflict, max_examples=max_logged)
    records = _collect(
        _parquet_rows(path),
        lambda row: _record_from_parquet_row(row, name),
        stats,
        id_prefix=id_prefix or name,
        deduplicate=deduplicate,
        on_conflict=on_conflict,
    )
    return records, stats


def _jsonl_rows(path: epath.PathLike) -> Iterator[tuple[str, Any]]:
    """Yields (file name, parsed line or MalformedRow) for every non-blank line."""
    for file in _files(path, ".jsonl"):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); a JSONL file "
                            "holds one JSON object per line") from e
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                yield file.name, json.loads(line)
            except json.JSONDecodeError as e:
                yield file.name, MalformedRow(f"line is not valid JSON ({e.msg})")


def _record_from_jsonl_row(
    row: Any, data_source: str, template: PromptTemplate
) -> tuple[PromptRecord, Any]:
    """Wraps a `{id, problem, answer, ...}` row into a single-user-message DAPO prompt."""
    if isinstance(row, MalformedRow):
        raise row
    if not isinstance(row, dict):
        raise MalformedRow(f"row must be a JSON object, got {type(row).__name__}")
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise MalformedRow(f"problem must be a non-empty string, got {problem!r:.40}")
    answer = validate_answer(row.get("answer"), "answer")
    row_id = row.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise MalformedRow(f"id must be a string or an integer, got {type(row_id).__name__}")
    extra = {k: v for k, v in row.items() if k not in ("id", "problem", "answer") and v is not None}
    extra["raw_problem"] = problem
    record: PromptRecord = {
        "id": "",
        "data_source": data_source,
        "prompt": [{"role": "user", "content": template.wrap(problem)}],
        "ground_truth": answer,
        "extra": extra,
    }
    return record, row_id


def load_jsonl_problems(
    path: epath.PathLike,
    *,
    data_source: str | None = None,
    template: str | PromptTemplate = "dapo",
    deduplicate: bool = True,
    on_conflict: ConflictPolicy = "keep_first",
    max_logged: int = 5,
) -> tuple[list[PromptRecord], LoadStats]:
    """Reads `{id, problem, answer}` JSONL (AIME 2024/2025, MATH-500) into DAPO-template PromptRecords.

    Ids are the rows' own `id` values when present, else `<file stem>-<row>`; `data_source`
    defaults to the file stem (e.g. "aime2025").
    """
    name = _dataset_name(path)
    source = data_source or name
    resolved = get_template(template)
    stats = LoadStats(source=str(path), conflict_policy=on_conflict, max_examples=max_logged)

    records = _collect(
        _jsonl_rows(path),
        lambda row: _record_from_jsonl_row(row, source, resolved),
        stats,
        id_prefix=name,
        deduplicate=deduplicate,
        on_conflict=on_conflict,
        verbatim_ids=True,  # rows carry readable ids ("2024-I-01", "test/algebra/1.json")
    )
    return records, stats


def source_format(path: epath.PathLike) -> Literal["jsonl", "parquet"]:
    """"jsonl" for a `.jsonl` file or a folder holding any, "parquet" for a `.parquet` file or other folder."""
    path = epath.Path(path)
    if path.name.endswith(".jsonl") or (path.is_dir() and any(path.glob("*.jsonl"))):
        return "jsonl"
    if path.name.endswith(".parquet") or path.is_dir():
        return "parquet"
    raise DataError(f"{path}: expected a .parquet or .jsonl file (or a folder of them)")


def source_files(path: epath.PathLike) -> list[epath.Path]:
    """The files a reader reads for `path`, in the order it reads them."""
    return _files(path, "." + source_format(path))


def load_prompt_records(
    path: epath.PathLike, *, template: str | PromptTemplate = "dapo", **kwargs: Any
) -> tuple[list[PromptRecord], LoadStats]:
    """Dispatches on the suffix: `.parquet` (or a folder of them) or `.jsonl`.

    `template` wraps JSONL problems; parquet rows carry their templated prompt already.
    """
    if source_format(path) == "jsonl":
        return load_jsonl_problems(path, template=template, **kwargs)
    return load_dapo_parquet(path, **kwargs)
