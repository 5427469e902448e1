"""benchmarks.dapo_step runs a whole DAPO step end to end and prints its table with positive
timings; without TRL it says how to install it. No timing assertions: this machine is shared."""

import json

import pytest

from benchmarks import common, dapo_step


def _cells(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    (row,) = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
    return dict(zip(dapo_step.COLUMNS, row))


def _numbers(cell: str) -> list[float]:
    return [float(x.strip().rstrip("x")) for x in cell.replace("+", "/").split("/")]


def test_our_step_smoke_prints_the_table_with_positive_timings(capsys, tmp_path):
    out = tmp_path / "dapo_step.json"
    assert dapo_step.main(["--smoke", "--skip_trl", "--workdir", str(tmp_path),
                           "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert common.table_headers(text) == [dapo_step.COLUMNS]
    cells = _cells(text)
    assert cells["setting"] == "toy 2x4, 8 new"
    step = _numbers(cells["ours s/step"])[0]
    split = _numbers(cells["ours gen / old-logp / update s"])
    assert step > 0 and len(split) == 3 and all(x > 0 for x in split)
    assert sum(split) <= step  # the phases are parts of the step's wall time
    assert all(x > 0 for x in _numbers(cells["ours first step s"]))
    assert cells["TRL s/step"] == cells["TRL / ours"] == "n/a"
    result = json.loads(out.read_text())
    assert result["columns"] == dapo_step.COLUMNS
    (timed,) = result["results"][0]["ours"]["timed"]
    assert timed["response_length"] <= 8


def test_missing_trl_names_the_requirements_file_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(dapo_step, "trl_available", lambda: False)
    assert dapo_step.main(["--smoke"]) == 2
    assert "requirements-bench.txt" in capsys.readouterr().err


def test_trl_step_smoke_at_equal_work_gives_a_ratio(capsys, tmp_path):
    pytest.importorskip("trl")
    assert dapo_step.main(["--smoke", "--equal_work", "--workdir", str(tmp_path)]) == 0
    cells = _cells(capsys.readouterr().out)
    assert cells["setting"] == "toy 2x4, 8 new, equal work"
    ours, trl = _numbers(cells["ours s/step"])[0], _numbers(cells["TRL s/step"])[0]
    assert ours > 0 and trl > 0
    assert all(x >= 0 for x in _numbers(cells["TRL gen / score+old-logp / update s"]))
    assert _numbers(cells["TRL / ours"])[0] == pytest.approx(trl / ours, rel=0.02)


def test_random_weight_presets_time_equal_work_and_the_toy_does_not(capsys):
    # Random weights never stop, so without equal work every sample would be overlong-filtered
    # out of our loss (nothing to compute) but not out of TRL's work.
    assert dapo_step.parse_args(["--preset", "qwen2.5-0.5b", "--short"]).equal_work
    assert "equal_work" in capsys.readouterr().out
    assert not dapo_step.parse_args([]).equal_work


def test_smoke_and_short_keep_their_step_counts():
    smoke = dapo_step.parse_args(["--smoke"])
    assert (smoke.steps, smoke.warmup) == (1, 1)
    short = dapo_step.parse_args(["--preset", "qwen2.5-0.5b", "--short"])
    assert (short.steps, short.warmup, short.prompts, short.samples) == (1, 1, 4, 4)
    full = dapo_step.parse_args(["--preset", "qwen2.5-0.5b"])
    assert (full.steps, full.warmup) == (3, 1)
