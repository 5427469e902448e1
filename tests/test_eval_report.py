"""Reports: exact metrics for a crafted AIME 2024 response file, and the written files' contents."""
import json
import math

import numpy as np
import pytest

from dapo_jax.eval.report import read_problems_jsonl, score_responses_file, write_report

N = 32


def _correct(answer: int, j: int) -> str:
    formats = [
        "Let me work through it. " * 40 + "\nAnswer: {a}",
        "Answer: \\boxed{{{a}}}",
        "ANSWER : ${a}$",
        "So we are done.\nAnswer:\n{a}",
    ]
    return formats[j % len(formats)].format(a=answer)


def _wrong(answer: int, j: int) -> str:
    formats = [
        "Answer: {b}",
        "**Answer:** {a}",  # markdown label: normalises to "**{a}"
        "The answer is \\boxed{{{a}}}",  # no Answer line
        "Answer: {a}.",  # trailing period
        "Answer: {a}\n" + "x" * 300,  # outside the last 300 characters
    ]
    return formats[j % len(formats)].format(a=answer, b=answer + 1)


def _same_wrong(answer: int, j: int) -> str:
    # Two spellings of one wrong answer, so majority voting sees a single prediction.
    return f"Answer: {answer + 1}" if j % 2 else f"Answer: \\boxed{{{answer + 1}}}"


def _verl_maj_best(values, preds, k, n_bootstrap=1000, seed=42):
    """Independent re-enactment of verl's bootstrap (global seed, dict-order vote)."""
    np.random.seed(seed)
    best = [max(values[i] for i in np.random.choice(len(values), size=k, replace=True))
            for _ in range(n_bootstrap)]
    np.random.seed(seed)
    maj = []
    for _ in range(n_bootstrap):
        groups = {}
        for i in np.random.choice(len(values), size=k, replace=True):
            groups.setdefault(preds[i], []).append(values[i])
        maj.append(groups[max(groups, key=lambda p: len(groups[p]))][0])
    return float(np.mean(maj)), float(np.mean(best))


def test_crafted_aime2024_responses_give_exact_metrics(shared_data, tmp_path):
    problems_path = shared_data / "aime2024.jsonl"
    problems = [json.loads(line) for line in problems_path.read_text().splitlines() if line.strip()]
    assert len(problems) == 30

    # Problem p: all right (p % 3 == 0), all wrong in mixed ways (p % 3 == 1), or its first c_p
    # samples right and the rest one shared wrong answer (p % 3 == 2, c_p = p // 3 + 1).
    plan = {}
    for p, problem in enumerate(problems):
        if p % 3 == 0:
            plan[problem["id"]] = ("all", N)
        elif p % 3 == 1:
            plan[problem["id"]] = ("none", 0)
        else:
            plan[problem["id"]] = ("first", p // 3 + 1)

    rows = []
    for j in range(N):  # interleave problems; each problem's own order is kept
        for p, problem in enumerate(problems):
            kind, c = plan[problem["id"]]
            answer = problem["answer"]
            if kind == "none":
                text = _wrong(answer, j)
            elif j < c:
                text = _correct(answer, j)
            else:
                text = _same_wrong(answer, j)
            key = "id" if (p + j) % 2 else "problem_id"
            rows.append({key: problem["id"], "response": text, "length": 100 + j,
                         "finish_reason": "length" if j == N - 1 else "stop"})
    responses_path = tmp_path / "responses.jsonl"
    responses_path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    summary = score_responses_file(responses_path, problems_path, tmp_path / "out", dataset="aime2024")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    metrics = report["metrics"]

    correct_counts = [plan[p["id"]][1] for p in problems]
    for k in (1, 2, 4, 8, 16, 32):
        expected_avg = np.mean([min(c, k) / k for c in correct_counts])
        expected_pass = np.mean([1 - math.comb(N - c, k) / math.comb(N, k) for c in correct_counts])
        assert metrics[f"val-aux/aime2024/acc/avg@{k}"] == pytest.approx(expected_avg, abs=1e-12)
        assert metrics[f"val-aux/aime2024/acc/pass@{k}"] == pytest.approx(expected_pass, abs=1e-12)

    for k in (2, 4, 8, 16, 32):
        maj, best = [], []
        for problem in problems:
            kind, c = plan[problem["id"]]
            if kind == "first":
                values = [j < c for j in range(N)]
                preds = ["right" if j < c else "wrong" for j in range(N)]
                m, b = _verl_maj_best(values, preds, k)
            else:  # every draw is all right or all wrong
                m = b = 1.0 if kind == "all" else 0.0
            maj.append(m)
            best.append(b)
        section = "val-core" if k == N else "val-aux"
        assert metrics[f"{section}/aime2024/acc/maj@{k}/mean"] == pytest.approx(np.mean(maj), abs=1e-12)
        assert metrics[f"{section}/aime2024/acc/best@{k}/mean"] == pytest.approx(np.mean(best), abs=1e-12)

    headline_avg = np.mean(correct_counts) / N
    assert metrics["val-core/aime2024/acc/mean@32"] == pytest.approx(headline_avg, abs=1e-12)
    assert metrics["val-aux/aime2024/response_length/mean"] == pytest.approx(100 + 15.5)
    assert metrics["val-aux/aime2024/response_length/clip_ratio"] == pytest.approx(1 / 32)
    assert report["num_samples"] == 960 and report["problems_without_samples"] == []
    assert f"avg@32 {headline_avg:.4f}" in summary
    assert "30 problems x 32 samples = 960 responses" in summary

    by_id = {row["id"]: row for row in report["problems"]}
    first = problems[0]
    assert by_id[first["id"]]["accuracy"] == 1.0
    assert by_id[first["id"]]["majority_pred"] == str(first["answer"])
    fifth = problems[5]  # "first" kind with c = 2: majority is the shared wrong answer
    assert by_id[fifth["id"]]["num_correct"] == 2
    assert by_id[fifth["id"]]["majority_pred"] == str(fifth["answer"] + 1)
    assert by_id[fifth["id"]]["majority_correct"] is False


PROBLEMS = [{"id": "p1", "answer": "42"}, {"id": "p2", "answer": 7}, {"id": "p3", "answer": "a|b"}]


def _samples():
    return [
        {"problem_id": "p1", "response": "Answer: 42"},
        {"problem_id": "p2", "response": "Answer: 8"},
        {"problem_id": "p1", "response": "Answer: 41"},
        {"problem_id": "p2", "response": "Answer: 7"},
        {"problem_id": "p1", "response": "Answer: \\boxed{42}"},
        {"problem_id": "p2", "response": "Answer: 8"},
    ]


def test_report_files_hold_per_problem_rows_and_every_sample(tmp_path):
    summary = write_report(PROBLEMS, _samples(), tmp_path, dataset="toy", n_bootstrap=50)
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["id"]: row for row in report["problems"]}
    assert rows["p1"] == {"id": "p1", "answer": "42", "num_samples": 3, "num_correct": 2,
                          "accuracy": pytest.approx(2 / 3), "majority_pred": "42",
                          "majority_count": 2, "majority_correct": True}
    assert rows["p2"]["majority_pred"] == "8" and rows["p2"]["majority_correct"] is False
    assert rows["p3"] == {"id": "p3", "answer": "a|b", "num_samples": 0}
    assert report["problems_without_samples"] == ["p3"]
    assert report["metrics"]["val-core/toy/acc/mean@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)

    markdown = (tmp_path / "report.md").read_text()
    assert "| 1 | `p1` | `42` | 0.6667 | 2 / 3 | `42` | yes |" in markdown
    assert "| 2 | `p2` | `7` | 0.3333 | 1 / 3 | `8` | no |" in markdown
    assert "| 3 | `p3` | `a\\|b` | – | 0 / 0 | (no samples) | – |" in markdown
    assert "| avg@3 | 0.5000 |" in markdown

    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample_index"], r["acc"], r["pred"]) for r in lines] == [
        ("p1", 0, True, "42"), ("p2", 0, False, "8"), ("p1", 1, False, "41"),
        ("p2", 1, True, "7"), ("p1", 2, True, "42"), ("p2", 2, False, "8"),
    ]
    assert lines[4]["response"] == "Answer: \\boxed{42}" and lines[4]["score"] == 1.0

    assert "toy: 2 problems x 3 samples = 6 responses" in summary
    assert "warning: 1 problems have no samples and are left out: p3" in summary
    assert str(tmp_path / "report.md") in summary
    assert len(summary.splitlines()) <= 24


def test_read_problems_jsonl_keeps_ids_and_stringifies_answers(shared_data):
    problems = read_problems_jsonl(shared_data / "aime2024.jsonl")
    assert problems[0] == {"id": "2024-I-01", "answer": "204"}


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "p1", "response": "Answer: 42"}', "{not json"], r"line 2: not valid JSON"),
        (['{"id": "p1", "response": "Answer: 42"}', "", '{"id": "p1"}'], r"line 3: needs a 'response'"),
        (['{"id": "p9", "response": "x"}'], r"line 1: unknown problem id 'p9'"),
        (['{"response": "x"}'], r"line 1: needs an 'id'"),
        (['{"id": "p1", "problem_id": "p2", "response": "x"}'], r"line 1: 'id' and 'problem_id' disagree"),
        (['["p1", "x"]'], r"line 1: expected a JSON object"),
        (['{"id": "p1", "response": "x", "length": "long"}'], r"line 1: 'length' must be int"),
        ([""], r"no responses found"),
    ],
)
def test_responses_file_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        score_responses_file(path, PROBLEMS, tmp_path / "out")


def test_boxed_fallback_option_reaches_the_scorer_and_the_report(tmp_path):
    # A bare box (no Answer line) is wrong for the DAPO release's rule, right with verl's fallback.
    samples = [{"problem_id": "p1", "response": "so it is \\boxed{42}"},
               {"problem_id": "p2", "response": "Answer: 7"}]
    for flag, expected in ((False, [False, True]), (True, [True, True])):
        out = tmp_path / str(flag)
        write_report(PROBLEMS, samples, out, dataset="toy", n_bootstrap=10, boxed_fallback=flag)
        report = json.loads((out / "report.json").read_text())
        assert report["boxed_fallback"] is flag
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert [row["acc"] for row in rows] == expected


def test_write_report_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"samples\[0\] refers to unknown problem id 'zz'"):
        write_report(PROBLEMS, [{"problem_id": "zz", "response": "x"}], tmp_path)
    with pytest.raises(ValueError, match="duplicate problem id 'p1'"):
        write_report(PROBLEMS + [{"id": "p1", "answer": "1"}], _samples(), tmp_path)
    partial = _samples()
    partial[0] = {**partial[0], "length": 10}
    with pytest.raises(ValueError, match="'length' is given for 1 of 6 samples"):
        write_report(PROBLEMS, partial, tmp_path)
