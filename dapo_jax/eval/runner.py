"""Evaluation of a policy through any rollout backend: generate, score, write the reports.

Used by the trainer's validation and by `python -m dapo_jax.evaluate`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Sequence

import data_pipeline as dp
from dapo_jax.eval import report
from dapo_jax.sampler.rollout import RolloutRequest


def evaluate_records(driver, tokenizer, records: Sequence[dict], *, dataset: str, n: int, sampling,
                     max_new_tokens: int, max_prompt_length: int, system_prompt: str | None,
                     apply_chat_template: bool, out_dir, scorer: str = "math_dapo", seed: int = 0,
                     write: bool = True, boxed_fallback: bool = False,
                     truncation: str = "left") -> tuple[str, dict[str, float]]:
    """Generates n samples per problem, scores them and writes the reports; returns (summary, metrics).

    Prompts longer than `max_prompt_length` are cut as `truncation` (data.truncation) says."""
    rendered = dp.render_prompts(tokenizer, records, max_prompt_length=max_prompt_length,
                                 system_prompt=system_prompt, apply_chat_template=apply_chat_template,
                                 truncation=truncation)
    t0 = time.perf_counter()
    result = driver.generate([RolloutRequest(ids, n=n, max_new_tokens=max_new_tokens)
                              for ids in rendered.token_ids], seed=seed, sampling=sampling,
                             desc=f"eval {dataset}")
    gen_s = time.perf_counter() - t0
    problems = [{"id": r["id"], "answer": r["ground_truth"]} for r in records]
    samples = []
    for rec, group in zip(records, result.samples):
        for s in group:
            text = s.text if s.text is not None else tokenizer.decode(s.tokens, skip_special_tokens=True)
            samples.append({"problem_id": rec["id"], "response": text, "length": s.length,
                            "finish_reason": s.finish_reason})
    # Only the writing process (process 0) reports into the shared workdir; the others compute the
    # same metrics in a private folder (deleting their copies there deleted process 0's reports).
    out_dir = os.fspath(out_dir) if write else tempfile.mkdtemp(prefix="dapo_eval_")
    summary = report.write_report(problems, samples, out_dir, dataset=dataset, scorer=scorer,
                                  max_length=max_new_tokens, boxed_fallback=boxed_fallback)
    with open(os.path.join(out_dir, report.REPORT_JSON)) as f:
        metrics = dict(json.load(f)["metrics"])
    tokens = sum(s["length"] for s in samples)
    metrics[f"val-aux/{dataset}/timing_s/gen"] = gen_s
    metrics[f"val-aux/{dataset}/tokens_per_s"] = tokens / max(gen_s, 1e-9)
    if not write:
        shutil.rmtree(out_dir, ignore_errors=True)
    summary += f"\ngenerated {tokens:,} tokens in {gen_s:.1f}s ({tokens / max(gen_s, 1e-9):,.0f} tok/s)"
    return summary, metrics
