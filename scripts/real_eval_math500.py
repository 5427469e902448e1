"""Real-weights evaluation on MATH-500, checked against transformers (issue 14, point 3).

Evaluates Qwen2.5-Coder-0.5B-Instruct (the GGUF file) on the first N MATH-500 problems with
`python -m dapo_jax.evaluate`, (a) greedy and (b) n=4 at the paper's validation sampling
(temperature 1.0, top-p 0.7); then generates greedy responses with transformers from the same
GGUF file (float32, batched with left padding, the same chat-template-rendered prompt tokens, the
same stop tokens and max_new_tokens), scores them with `python -m dapo_jax.evaluate --responses`,
and compares the two greedy runs response by response.

    .venv/bin/python scripts/real_eval_math500.py --num_problems 100 --max_new_tokens 512 --out /tmp/real_eval

Stages (`--stages`, comma-separated, default all): ours_greedy, ours_sample, hf_greedy, compare.
Every stage writes under --out; `summary.json` collects accuracies, truncation counts and wall
times. Run it with `nice -n 15` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_MODEL = os.path.join(os.environ.get("DAPO_TEST_MODELS")
                             or os.path.expanduser("~/.cache/dapo_jax_test_models"),
                             "qwen2.5-coder-0.5b-instruct.gguf")
STAGES = ("ours_greedy", "ours_sample", "hf_greedy", "compare")  # transformers last: its memory stays with this process
# The evaluator's configuration for every stage: MATH-500 with the DAPO template, no system message
# (the chat template's default Qwen system block is left out, as in training), float32 everywhere
# so our greedy tokens can be compared with transformers' float32 ones.
MAX_PROMPT_LENGTH = 1024  # the first 100 MATH-500 prompts are at most 408 tokens: nothing is cut


def common_flags(args) -> list[str]:
    """`python -m dapo_jax.evaluate` flags shared by all stages."""
    return ["--config", "configs/eval_aime.py:math500",
            f"--config.eval.max_new_tokens={args.max_new_tokens}",
            f"--config.eval.max_problems={args.num_problems}",
            f"--config.data.max_prompt_length={MAX_PROMPT_LENGTH}",
            "--config.model.dtype=float32", "--config.rollout.cache_dtype=float32",
            "--config.mesh.num_devices=1",
            f"--config.rollout.max_concurrent_decodes={args.max_concurrent_decodes}",
            # Bounds the KV cache's RAM (float32, 24 KiB per token for this model); a full pool
            # preempts and resumes samples, which does not change what is generated.
            f"--config.rollout.kv_pool_tokens={args.kv_pool_tokens}"]


def run_evaluator(args, name: str, extra: list[str]) -> dict:
    """Runs `python -m dapo_jax.evaluate` into <out>/<name>; returns its math500 metrics + wall time."""
    out = os.path.join(args.out, name)
    cmd = [sys.executable, "-m", "dapo_jax.evaluate", *common_flags(args), "--out", out, *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)["math500"]
    return {"wall_s": wall, "metrics": metrics, "command": " ".join(cmd[1:])}


def read_samples(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncation_count(samples: list[dict]) -> int:
    return sum(s.get("finish_reason") == "length" for s in samples)


def ours(args, name: str, extra: list[str]) -> dict:
    result = run_evaluator(args, name, extra)
    samples = read_samples(os.path.join(args.out, name, "math500", "samples.jsonl"))
    result.update(num_responses=len(samples), hit_max_new_tokens=truncation_count(samples))
    return result


def hf_greedy(args) -> dict:
    """Greedy responses from transformers on the same prompt tokens; scored by the evaluator."""
    import torch
    from transformers import AutoModelForCausalLM

    import data_pipeline as dp
    from data_pipeline import datasets
    from configs import eval_aime
    from dapo_jax.models.tokenizer import load_tokenizer
    from dapo_jax import experiment

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = eval_aime.get_config("math500")
    records = dp.load_jsonl_problems(str(datasets.data_root() / "math500.jsonl"),
                                     template=config.data.template)
    records = (records[0] if isinstance(records, tuple) else records)[:args.num_problems]
    # The tokenizer our evaluator uses (the one inside the GGUF file) and the same rendering, so
    # both sides start from identical prompt token ids.
    tokenizer = load_tokenizer(args.model)
    rendered = dp.render_prompts(tokenizer, records, max_prompt_length=MAX_PROMPT_LENGTH,
                                 system_prompt=config.data.system_prompt,
                                 apply_chat_template=config.data.apply_chat_template)
    stop_ids, pad_id = experiment.stop_and_pad_ids(tokenizer, config.tokenizer.stop_tokens)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(args.model)),
                                                 gguf_file=os.path.basename(args.model),
                                                 dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t_load
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(records)), key=lambda i: -len(rendered.token_ids[i]))
    rows: dict[int, dict] = {}
    t0 = time.perf_counter()
    for start in range(0, len(order), args.hf_batch_size):
        batch = order[start:start + args.hf_batch_size]
        width = max(len(rendered.token_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding
            prompt = rendered.token_ids[i]
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=list(stop_ids),
                                 pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            stop_at = next((k for k, t in enumerate(new) if t in stop_ids), None)
            # As our sampler: the stop token ends the response and counts in its length.
            tokens = new if stop_at is None else new[:stop_at + 1]
            rows[i] = {"id": records[i]["id"], "response":
                       tokenizer.decode(tokens, skip_special_tokens=True), "length": len(tokens),
                       "finish_reason": "stop" if stop_at is not None else "length",
                       "tokens": tokens}
        print(f"transformers: {len(rows)}/{len(records)} problems, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    gen_s = time.perf_counter() - t0
    path = os.path.join(args.out, "hf_greedy_responses.jsonl")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        for i in range(len(records)):
            f.write(json.dumps(rows[i]) + "\n")
    result = run_evaluator(args, "hf_greedy", ["--responses", path, "--allow_partial"])
    result["score_wall_s"] = result.pop("wall_s")  # scoring only; generate_s is the generation
    result.update(generate_s=gen_s, load_s=load_s, responses_file=path,
                  num_responses=len(rows), hit_max_new_tokens=truncation_count(list(rows.values())))
    return result


def compare(args) -> dict:
    """Our greedy responses against transformers': identical texts/lengths, first divergence."""
    from dapo_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ours_rows = {s["problem_id"]: s for s in
                 read_samples(os.path.join(args.out, "ours_greedy", "math500", "samples.jsonl"))}
    hf_rows = {r["id"]: r for r in read_samples(os.path.join(args.out, "hf_greedy_responses.jsonl"))}
    identical, same_acc, divergence = 0, 0, []
    hf_scored = {s["problem_id"]: s for s in
                 read_samples(os.path.join(args.out, "hf_greedy", "math500", "samples.jsonl"))}
    for pid, hf in hf_rows.items():
        mine = ours_rows[pid]
        # Our samples file holds the text and length; re-encoding our text gives its tokens (the
        # texts of both sides decode the same way, so equal tokens <=> equal text and length).
        mine_tokens = tokenizer.encode(mine["response"], add_special_tokens=False)
        hf_tokens = tokenizer.encode(hf["response"], add_special_tokens=False)
        if mine["response"] == hf["response"] and mine["length"] == hf["length"]:
            identical += 1
        else:
            k = next((k for k, (a, b) in enumerate(zip(mine_tokens, hf_tokens)) if a != b),
                     min(len(mine_tokens), len(hf_tokens)))
            divergence.append({"id": pid, "first_differing_token": k,
                               "ours_length": mine["length"], "hf_length": hf["length"]})
        same_acc += bool(mine["acc"]) == bool(hf_scored[pid]["acc"])
    return {"num_compared": len(hf_rows), "token_identical": identical,
            "same_correctness": same_acc, "differing": divergence}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the .gguf file")
    p.add_argument("--num_problems", type=int, default=100, help="first N MATH-500 problems")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--out", default="/tmp/real_eval_math500")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--max_concurrent_decodes", type=int, default=128)
    p.add_argument("--kv_pool_tokens", type=int, default=65536)
    p.add_argument("--hf_batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    summary["settings"] = {"model": args.model, "num_problems": args.num_problems,
                           "max_new_tokens": args.max_new_tokens}
    greedy = ["--config.eval.n=1", "--config.eval.temperature=0.0"]
    sample = ["--config.eval.n=4", "--config.eval.temperature=1.0", "--config.eval.top_p=0.7"]
    for stage in stages:
        if stage == "ours_greedy":
            summary[stage] = ours(args, stage, ["--checkpoint", args.model, *greedy])
        elif stage == "ours_sample":
            summary[stage] = ours(args, stage, ["--checkpoint", args.model, *sample])
        elif stage == "hf_greedy":
            summary[stage] = hf_greedy(args)
        else:
            summary[stage] = compare(args)
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"{stage}: {json.dumps(summary[stage])[:600]}", flush=True)


if __name__ == "__main__":
    main()
