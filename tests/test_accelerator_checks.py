"""The prepared GPU/TPU run (benchmarks.accelerator_checks): every stage's flags parse in its own
module, the smoke run drives all stages end to end into one summary, and the budget skips stages."""

import importlib
import json

import pytest

from benchmarks import accelerator_checks as ac


@pytest.mark.parametrize("stage", ac.stages(smoke=False), ids=lambda s: s.name)
def test_every_accelerator_stage_passes_flags_its_module_accepts(stage):
    module, flags = stage.argv[1], list(stage.argv[2:])
    args = importlib.import_module(module).parse_args([*flags, "--json", "x.json"])
    assert args.json == "x.json"
    if module == "benchmarks.model_step":
        # Issue 15 point 6: bf16, packed 4k-token rows.
        assert (args.dtype, args.seq_len, args.samples_per_row) == ("bfloat16", 4096, 4)
    if module == "benchmarks.rollout_throughput":
        # Issue 16 point 7: batch 64 and 256, both presets, without the transformers baseline.
        assert args.batches == [64, 256] and args.skip_hf and args.dtype == "bfloat16"
        assert args.presets == list(ac.PRESETS) and args.kv_cache == "paged"
    if module == "benchmarks.train_throughput":
        assert (args.dtype, args.max_len, args.layouts) == ("bfloat16", 4096, ["packed"])


def test_both_presets_are_covered_by_model_step_and_train_throughput():
    names = [s.name for s in ac.stages(smoke=False)]
    assert names[0] == "parity"  # correctness before any timing
    for p in ac.PRESETS:
        assert f"model_step {p}" in names and f"train_throughput {p}" in names


def test_smoke_run_drives_every_stage_into_one_summary(tmp_path, capsys):
    out = ac.main(["--smoke", "--out", str(tmp_path)])
    assert [s["status"] for s in out["stages"]] == ["ok"] * 4, out["stages"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "results.json", "summary.md"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary_rows"] == out["summary_rows"]
    checks = [r[0] for r in out["summary_rows"]]
    assert checks[0].startswith("parity: attention blockwise vs dense")
    assert any(c.startswith("model_step tiny") for c in checks)
    assert any(c.startswith("decode tiny batch 4") for c in checks)
    assert any(c.startswith("train_throughput tiny packed") for c in checks)
    parity = out["stages"][0]["result"]
    assert parity["attention"]["ok"] and parity["engine"]["ok"]
    # The small pool really preempted, and still every sample matched the dense engine.
    small = parity["engine"]["sampled, small pool"]
    assert small["preemptions"] > 0 and small["identical"] == small["samples"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# accelerator checks on cpu") and "Stage times:" in summary
    assert "[train_throughput tiny: ok" in (tmp_path / "log.txt").read_text()


def test_stages_that_do_not_fit_the_budget_are_skipped_and_named(tmp_path):
    out = ac.main(["--smoke", "--budget_s", "1", "--out", str(tmp_path)])
    assert [s["status"] for s in out["stages"]] == ["skipped (budget)"] * 4
    assert "skipped, " in (tmp_path / "log.txt").read_text()
    with pytest.raises(SystemExit, match="selects no stage"):
        ac.main(["--smoke", "--only", "nothing", "--out", str(tmp_path)])


def test_a_stage_that_hangs_is_killed_at_its_limit_and_a_failing_one_reports_its_last_lines():
    logged = []
    hang = ac.Stage("hang", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 1, 0)
    out = ac.run_stage(hang, 1.0, logged.append)
    assert out["status"] == "timed out after 1 s" and out["result"] is None
    assert out["seconds"] < 30 and "started" in out["error"]
    fail = ac.Stage("fail", ("-c", "import sys; print('bad flag: --x'); sys.exit(3)"), 30, 0)
    out = ac.run_stage(fail, 30.0, logged.append)
    assert out["status"] == "exit status 3" and out["error"] == "bad flag: --x"
    # Output reaches the log line by line, with each stage's header and verdict.
    text = "".join(logged)
    assert "### hang (limit 1 s)" in text and "[fail: exit status 3," in text
