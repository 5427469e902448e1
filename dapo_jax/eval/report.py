"""Score sampled responses for a problem set and write the evaluation to disk.

`write_report` scores in-memory samples; `score_responses_file` does the same for a JSONL file of
responses (the `--responses FILE` path). Both write, into `out_dir`:
  report.json    metrics (verl names) and one record per problem,
  report.md      a headline table and one row per problem (id, answer, accuracy, majority answer),
  samples.jsonl  every scored sample,
and return a one-screen text summary.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dapo_jax.eval import metrics as eval_metrics
from dapo_jax.rewards.batch import score_batch
from dapo_jax.runtime.cli_errors import MissingFileError, UserError

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SAMPLES_JSONL = "samples.jsonl"
_MD_CELL_CHARS = 60

PathLike = str | os.PathLike


def _check_problems(problems: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(id, answer) pairs as strings, with missing fields and duplicate ids reported by index."""
    if len(problems) == 0:
        raise ValueError("no problems given: pass records with 'id' and 'answer'")
    pairs, seen = [], set()
    for index, problem in enumerate(problems):
        for field in ("id", "answer"):
            if field not in problem or problem[field] is None:
                raise ValueError(
                    f"problems[{index}] has no '{field}' field; every problem needs id and answer"
                )
        problem_id = str(problem["id"])
        if problem_id in seen:
            raise ValueError(
                f"problems[{index}]: duplicate problem id {problem_id!r}; ids must be unique"
            )
        seen.add(problem_id)
        pairs.append((problem_id, str(problem["answer"])))
    return pairs


def read_problems_jsonl(path: PathLike) -> list[dict[str, str]]:
    """Problems from a JSONL file with one {"id", "answer", ...} object per line."""
    problems = []
    for line_number, row in _read_jsonl_objects(path):
        for field in ("id", "answer"):
            if field not in row:
                raise UserError(f"{path}, line {line_number}: missing '{field}' field")
        problems.append({"id": str(row["id"]), "answer": str(row["answer"])})
    return problems


def _read_jsonl_objects(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} does not exist (or is a folder): pass a JSONL file with one "
                               "JSON object per line")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"{path}, line {line_number}: not valid JSON ({error.msg})"
                raise UserError(message) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield line_number, row


def _optional_fields(samples: Sequence[Mapping[str, Any]], field: str, kind: type) -> list | None:
    """All values of an optional per-sample field, or None when no sample has it."""
    present = [index for index, sample in enumerate(samples) if sample.get(field) is not None]
    if not present:
        return None
    if len(present) != len(samples):
        missing = next(i for i in range(len(samples)) if samples[i].get(field) is None)
        raise ValueError(
            f"'{field}' is given for {len(present)} of {len(samples)} samples (first missing: "
            f"samples[{missing}]); give it for every sample or for none"
        )
    values = [sample[field] for sample in samples]
    for index, value in enumerate(values):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"samples[{index}]['{field}'] must be {kind.__name__}, got {value!r}")
    return values


def _md_cell(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _MD_CELL_CHARS:
        text = text[: _MD_CELL_CHARS - 1] + "…"
    # A pipe would end the table cell, even inside a code span.
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""


def _problem_rows(
    answers: Sequence[tuple[str, str]], scored: Mapping[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    rows = []
    for problem_id, answer in answers:
        samples = scored.get(problem_id, [])
        row: dict[str, Any] = {"id": problem_id, "answer": answer, "num_samples": len(samples)}
        if samples:
            majority = eval_metrics.majority_vote([s["pred"] for s in samples])
            row.update(
                num_correct=sum(s["acc"] for s in samples),
                accuracy=sum(s["acc"] for s in samples) / len(samples),
                majority_pred=majority,
                majority_count=sum(s["pred"] == majority for s in samples),
                majority_correct=next(s["acc"] for s in samples if s["pred"] == majority),
            )
        rows.append(row)
    return rows


def _markdown(dataset: str, scorer: str, headline: Mapping[str, float], rows: list[dict]) -> str:
    lines = [f"# {dataset} evaluation (scorer: {scorer})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in headline.items()]
    lines += [
        "",
        "| # | id | answer | accuracy | correct / samples | majority prediction "
        "| majority correct |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(rows, start=1):
        if row["num_samples"] == 0:
            cells = ["–", "0 / 0", "(no samples)", "–"]
        else:
            cells = [
                f"{row['accuracy']:.4f}",
                f"{row['num_correct']} / {row['num_samples']}",
                _md_cell(row["majority_pred"]),
                "yes" if row["majority_correct"] else "no",
            ]
        cells = [str(number), _md_cell(row["id"]), _md_cell(row["answer"]), *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _summary(
    dataset: str,
    scorer: str,
    counts: Sequence[int],
    metrics: Mapping[str, float],
    headline: Mapping[str, float],
    missing: Sequence[str],
    paths: Mapping[str, pathlib.Path],
) -> str:
    per_problem = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    lines = [
        f"{dataset}: {len(counts)} problems x {per_problem} samples = {sum(counts)} responses "
        f"(scorer {scorer})",
        "  " + "   ".join(f"{name} {value:.4f}" for name, value in headline.items()),
    ]
    prefix = f"val-aux/{dataset}/acc/"
    for kind in ("avg", "pass"):
        ks = [(name.rsplit("@", 1)[1], value) for name, value in metrics.items()
              if name.startswith(f"{prefix}{kind}@")]
        lines.append(f"  {kind}@k: " + "  ".join(f"k={k} {value:.4f}" for k, value in ks))
    length_prefix = f"val-aux/{dataset}/response_length/"
    if f"{length_prefix}mean" in metrics:
        text = (
            f"  response length: mean {metrics[length_prefix + 'mean']:.1f}  "
            f"min {metrics[length_prefix + 'min']:.0f}  max {metrics[length_prefix + 'max']:.0f}"
        )
        if f"{length_prefix}clip_ratio" in metrics:
            text += f"  truncated {100 * metrics[length_prefix + 'clip_ratio']:.1f}%"
        lines.append(text)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        lines.append(
            f"  warning: {len(missing)} problems have no samples and are left out: {shown}"
        )
    lines.append("  wrote " + ", ".join(str(path) for path in paths.values()))
    return "\n".join(lines)


def write_report(
    problems: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    out_dir: PathLike,
    *,
    dataset: str = "eval",
    scorer: str = "math_dapo",
    scorer_kwargs: Mapping[str, Any] | None = None,
    boxed_fallback: bool = False,
    num_workers: int | None = None,
    max_length: int | None = None,
    n_bootstrap: int = eval_metrics.N_BOOTSTRAP,
    seed: int = eval_metrics.BOOTSTRAP_SEED,
) -> str:
    """Score `samples` ({problem_id, response[, length, finish_reason]}) and write the reports.

    `problems` are {id, answer} records; samples of a problem are taken in the order given (avg@k
    uses each problem's first k). `scorer`, `scorer_kwargs` and `boxed_fallback` go to score_batch.
    Returns the text summary.
    """
    answers = _check_problems(problems)
    answer_by_id = dict(answers)
    if len(samples) == 0:
        raise ValueError("no samples given: pass {problem_id, response} records")
    for index, sample in enumerate(samples):
        if "problem_id" not in sample:
            raise ValueError(f"samples[{index}] has no 'problem_id' field")
        if str(sample["problem_id"]) not in answer_by_id:
            raise ValueError(
                f"samples[{index}] refers to unknown problem id {sample['problem_id']!r}; "
                f"known ids look like {[pid for pid, _ in answers[:3]]}"
            )
        if not isinstance(sample.get("response"), str):
            raise ValueError(f"samples[{index}] needs a 'response' string")
    lengths = _optional_fields(samples, "length", int)
    finish_reasons = _optional_fields(samples, "finish_reason", str)

    problem_ids = [str(sample["problem_id"]) for sample in samples]
    results = score_batch(
        [sample["response"] for sample in samples],
        [answer_by_id[pid] for pid in problem_ids],
        scorer=scorer,
        num_workers=num_workers,
        scorer_kwargs=scorer_kwargs,
        boxed_fallback=boxed_fallback,
    )
    scored: dict[str, list[dict[str, Any]]] = {}
    records = []
    for index, (sample, pid, result) in enumerate(zip(samples, problem_ids, results)):
        record = {
            "problem_id": pid,
            "sample_index": len(scored.setdefault(pid, [])),
            "answer": answer_by_id[pid],
            "response": sample["response"],
            "pred": result["pred"],
            "acc": bool(result["acc"]),
            "score": float(result["score"]),
        }
        if lengths is not None:
            record["length"] = lengths[index]
        if finish_reasons is not None:
            record["finish_reason"] = finish_reasons[index]
        scored[pid].append(record)
        records.append(record)

    ordered = [pid for pid, _ in answers if pid in scored]
    missing = [pid for pid, _ in answers if pid not in scored]
    per_problem = [[(s["acc"], s["pred"]) for s in scored[pid]] for pid in ordered]
    metrics = eval_metrics.evaluation_metrics(
        per_problem, dataset, lengths=lengths, finish_reasons=finish_reasons,
        max_length=max_length, n_bootstrap=n_bootstrap, seed=seed,
    )
    headline = eval_metrics.headline(metrics, dataset)
    rows = _problem_rows(answers, scored)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD, "samples": out / SAMPLES_JSONL}
    counts = [len(scored[pid]) for pid in ordered]
    report = {
        "dataset": dataset,
        "scorer": scorer,
        "boxed_fallback": boxed_fallback,
        "num_problems": len(answers),
        "num_scored_problems": len(ordered),
        "num_samples": len(records),
        "samples_per_problem": {"min": min(counts), "max": max(counts)},
        "headline": headline,
        "metrics": metrics,
        "problems": rows,
        "problems_without_samples": missing,
        "files": {name: str(path) for name, path in paths.items()},
    }
    paths["json"].write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(_markdown(dataset, scorer, headline, rows), encoding="utf-8")
    with open(paths["samples"], "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return _summary(dataset, scorer, counts, metrics, headline, missing, paths)


def read_responses_jsonl(path: PathLike, known_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Samples from JSONL rows {"id" or "problem_id", "response"[, "length", "finish_reason"]}.

    Errors name the file and line of the first bad row.
    """
    known = set(known_ids)
    samples = []
    for line_number, row in _read_jsonl_objects(path):
        where = f"{path}, line {line_number}"
        ids = {str(row[key]) for key in ("id", "problem_id") if row.get(key) is not None}
        if not ids:
            raise UserError(f"{where}: needs an 'id' (or 'problem_id') field naming the problem")
        if len(ids) > 1:
            raise UserError(f"{where}: 'id' and 'problem_id' disagree ({sorted(ids)}); keep one")
        problem_id = ids.pop()
        if problem_id not in known:
            raise UserError(
                f"{where}: unknown problem id {problem_id!r}; the problems have ids like "
                f"{sorted(known)[:3]}"
            )
        if not isinstance(row.get("response"), str):
            raise UserError(f"{where}: needs a 'response' field holding the response text")
        sample = {"problem_id": problem_id, "response": row["response"]}
        for field, kind in (("length", int), ("finish_reason", str)):
            if row.get(field) is not None:
                if not isinstance(row[field], kind) or isinstance(row[field], bool):
                    raise UserError(
                        f"{where}: '{field}' must be {kind.__name__}, got {row[field]!r}"
                    )
                sample[field] = row[field]
        samples.append(sample)
    if not samples:
        raise UserError(f"{path}: no responses found (the file has no JSON rows)")
    return samples


def score_responses_file(
    responses_jsonl: PathLike,
    problems: Sequence[Mapping[str, Any]] | PathLike,
    out_dir: PathLike,
    **report_kwargs: Any,
) -> str:
    """Score a responses JSONL against `problems` (records or a JSONL path); see write_report."""
    if isinstance(problems, (str, os.PathLike)):
        problems = read_problems_jsonl(problems)
    answers = _check_problems(problems)
    samples = read_responses_jsonl(responses_jsonl, [pid for pid, _ in answers])
    return write_report(problems, samples, out_dir, **report_kwargs)
