"""Readers: DAPO parquet / JSONL -> de-duplicated PromptRecords; malformed rows skipped and reported."""
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import load_dapo_parquet, load_jsonl_problems, load_prompt_records

# Typed out here (not imported) so the tests check the code's template against the DAPO text.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def dapo17k(shared_data):
    return load_dapo_parquet(shared_data / "dapo-math-17k.parquet")


def test_dapo_math_17k_gives_17290_unique_prompts_with_integer_string_answers(dapo17k, shared_data):
    records, stats = dapo17k
    raw = pq.read_table(shared_data / "dapo-math-17k.parquet").to_pylist()
    assert stats.num_rows == len(raw) == 17917
    assert len(records) == 17290
    # Independent count: distinct prompt texts straight from pyarrow.
    assert len({row["prompt"][0]["content"] for row in raw}) == 17290
    assert len({r["prompt"][0]["content"] for r in records}) == 17290
    assert len({r["id"] for r in records}) == 17290
    assert all(isinstance(r["ground_truth"], str) and re.fullmatch(r"-?\d+", r["ground_truth"]) for r in records)
    assert sum(abs(int(r["ground_truth"])) > INT64_MAX for r in records) == 3
    assert stats.num_records + stats.num_duplicates + stats.num_conflicting_duplicates == stats.num_rows
    assert all(r["prompt"][0]["content"].startswith(DAPO_PREFIX) for r in records)


def test_dapo_math_17k_first_occurrence_wins_on_conflicting_answers(dapo17k, shared_data):
    records, stats = dapo17k
    raw = pq.read_table(shared_data / "dapo-math-17k.parquet").to_pylist()
    first_answer = {}
    for row in raw:
        first_answer.setdefault(row["prompt"][0]["content"], row["reward_model"]["ground_truth"])
    assert all(first_answer[r["prompt"][0]["content"]] == r["ground_truth"] for r in records)
    assert stats.num_conflicting_duplicates == 11  # same problem text, different answer, in the source


def test_aime_2024_parquet_gives_30_problems_matching_the_jsonl_answers(shared_data):
    records, stats = load_dapo_parquet(shared_data / "aime-2024.parquet")
    assert (stats.num_rows, len(records), stats.num_duplicates) == (960, 30, 930)
    jsonl = [json.loads(line) for line in (shared_data / "aime2024.jsonl").read_text().splitlines()]
    expected = {(row["dapo_index"], str(row["answer"])) for row in jsonl}
    assert {(r["extra"]["index"], r["ground_truth"]) for r in records} == expected


def test_jsonl_problems_are_wrapped_in_the_dapo_template(shared_data):
    for name, size in [("aime2024", 30), ("aime2025", 30), ("math500", 500)]:
        rows = [json.loads(line) for line in (shared_data / f"{name}.jsonl").read_text().splitlines()]
        records, stats = load_jsonl_problems(shared_data / f"{name}.jsonl")
        assert len(records) == size and stats.num_malformed == 0
        for row, record in zip(rows, records):
            assert record["prompt"] == [{"role": "user", "content": DAPO_PREFIX + row["problem"] + DAPO_SUFFIX}]
            assert record["ground_truth"] == str(row["answer"]) and record["id"] == row["id"]
            assert record["data_source"] == name


def test_jsonl_aime_2024_prompts_equal_the_dapo_authors_parquet_prompts(shared_data):
    parquet, _ = load_dapo_parquet(shared_data / "aime-2024.parquet")
    jsonl, _ = load_prompt_records(shared_data / "aime2024.jsonl")
    assert {r["prompt"][0]["content"] for r in jsonl} == {r["prompt"][0]["content"] for r in parquet}


def _dapo_row(content, answer, index):
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": content, "role": "user"}] if content is not None else [],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index},
    }


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_malformed_parquet_rows_are_skipped_counted_and_named_in_the_log(tmp_path, caplog):
    rows = [
        _dapo_row("What is 1+1?", "2", 0),
        _dapo_row("What is 2+2?", None, 1),  # missing answer
        _dapo_row("What is 3+3?", "  ", 2),  # empty answer
        _dapo_row(None, "4", 3),  # empty prompt list
        _dapo_row("", "5", 4),  # empty message content
        _dapo_row("What is 5+5?", "10", 5),
    ]
    path = _write_parquet(tmp_path / "bad.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        records, stats = load_dapo_parquet(path, max_logged=3)
    assert [r["ground_truth"] for r in records] == ["2", "10"]
    assert stats.num_malformed == 4 and stats.num_rows == 6
    assert [row for row, _ in stats.malformed_examples] == [1, 2, 3]  # only the first max_logged
    assert "ground_truth is empty" in stats.malformed_examples[1][1]
    assert "row 1:" in caplog.text and "row 3:" in caplog.text and "4 malformed" in caplog.text


def test_wrongly_typed_parquet_rows_are_skipped(tmp_path):
    # One parquet file has one type per column, so the wrong types live in a second file of a folder.
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_parquet(folder / "a.parquet", [_dapo_row("ok", "7", 0)])
    _write_parquet(folder / "b.parquet", [{"prompt": "a plain string", "reward_model": {"ground_truth": "1"}}])
    float_answer = {"prompt": [{"role": "user", "content": "x"}], "reward_model": {"ground_truth": 1.5}}
    _write_parquet(folder / "c.parquet", [float_answer])
    records, stats = load_dapo_parquet(folder)
    assert [r["ground_truth"] for r in records] == ["7"]
    assert stats.num_malformed == 2
    assert "b.parquet: prompt must be a list" in stats.malformed_examples[0][1]
    assert "c.parquet: reward_model.ground_truth must be a string" in stats.malformed_examples[1][1]


def test_malformed_jsonl_rows_are_skipped_and_counted(tmp_path):
    lines = [
        json.dumps({"id": "a", "problem": "1+1?", "answer": 2}),
        "{not json",
        json.dumps({"id": "b", "problem": "2+2?"}),
        json.dumps({"id": "c", "problem": "3+3?", "answer": 6.0}),
        json.dumps({"id": "d", "problem": "", "answer": 1}),
        json.dumps({"id": "e", "problem": "4+4?", "answer": True}),
        json.dumps({"id": "f", "problem": "5+5?", "answer": "10"}),
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, stats = load_jsonl_problems(path)
    assert [(r["id"], r["ground_truth"]) for r in records] == [("a", "2"), ("f", "10")]
    assert stats.num_malformed == 5
    assert [row for row, _ in stats.malformed_examples] == [1, 2, 3, 4, 5]


def test_duplicate_policy_for_exact_and_conflicting_repeats(tmp_path):
    answers = [("P", "1"), ("P", "1"), ("P", "2"), ("Q", "3"), ("P", "2")]
    path = _write_parquet(tmp_path / "dups.parquet", [_dapo_row(p, a, i) for i, (p, a) in enumerate(answers)])
    first, stats = load_dapo_parquet(path)
    assert [(r["prompt"][0]["content"], r["ground_truth"]) for r in first] == [("P", "1"), ("Q", "3")]
    assert (stats.num_duplicates, stats.num_conflicting_duplicates) == (1, 2)
    every, stats = load_dapo_parquet(path, on_conflict="keep_all")
    assert [r["ground_truth"] for r in every] == ["1", "2", "3"]
    assert (stats.num_duplicates, stats.num_conflicting_duplicates) == (2, 0)
    dropped, _ = load_dapo_parquet(path, on_conflict="drop")
    assert [r["ground_truth"] for r in dropped] == ["3"]
    raw, _ = load_dapo_parquet(path, deduplicate=False)
    assert len(raw) == 5


def test_folder_of_parquet_files_is_read_in_name_order_with_unique_ids(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_parquet(folder / "b.parquet", [_dapo_row("B0", "1", 0)])
    _write_parquet(folder / "a.parquet", [_dapo_row("A0", "2", 0), _dapo_row("A1", "3", 1)])
    records, stats = load_dapo_parquet(folder)
    assert [r["prompt"][0]["content"] for r in records] == ["A0", "A1", "B0"]
    assert len({r["id"] for r in records}) == 3 and stats.num_rows == 3


def test_parquet_without_the_dapo_columns_is_rejected_with_the_column_name(tmp_path):
    path = _write_parquet(tmp_path / "other.parquet", [{"question": "x", "answer": "1"}])
    with pytest.raises(ValueError, match="reward_model"):
        load_dapo_parquet(path)
