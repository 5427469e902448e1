"""The GPU/TPU checks of issues 15 and 16 as one prepared run: correctness first, then speed.

An accelerator is lent for minutes, not hours, so everything it must answer runs from one command,
in order of importance, inside a time budget (a stage that would not fit is skipped, saying so):

1. `parity`: on the accelerator itself, the attention kernel `model.attention=auto` picks there
   (Pallas flash on GPU, splash on TPU) against the dense reference, outputs and gradients, on
   packed rows; and the paged engine against the dense one (greedy and sampled tokens, log-probs,
   a pool small enough to preempt). A wrong kernel makes every later number meaningless.
2. `model_step` at Qwen2.5-0.5B and 1.5B: forward + backward of the DAPO loss on packed 4k-token
   rows in bf16; MFU against the device's published bf16 peak (goal: 45%).
3. `rollout`: decode tok/s at batch 64 and 256, both presets, bf16, paged KV cache; the fraction
   of the HBM roofline (weights + the KV pages in use, read once per step; goal: 60%).
4. `train_throughput` at both presets: one DAPO update (old log-probs + optimizer update) on packed
   4k-token rows, bf16; MFU against the published peak.

Each stage runs in its own process (an out-of-memory error or a hang costs one stage, not the run)
and its report goes to the log; the results of all stages go to one JSON and the summary table to
one markdown file (`--out`), three files in all.

    python -m benchmarks.accelerator_checks --out /tmp/checks          # on the GPU/TPU host
    python -m benchmarks.accelerator_checks --smoke --out /tmp/checks  # tiny shapes, any machine
    python -m benchmarks.accelerator_checks --only parity              # one stage

docs/benchmarks.md has the exact command for a lent GPU (the device tool), with the one Python
package its image lacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

GOAL_MFU = 0.45  # issue 15, point 6
GOAL_ROOFLINE = 0.60  # issue 16, point 7
PRESETS = ("qwen2.5-0.5b", "qwen2.5-1.5b")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One benchmark process: module and flags, time limit, and the least time it needs."""
    name: str
    argv: tuple[str, ...]
    timeout_s: float
    min_s: float


def stages(smoke: bool) -> list[Stage]:
    """The checks in order of importance; `smoke`: the same wiring at tiny shapes."""
    me = ("-m", "benchmarks.accelerator_checks")
    if smoke:
        return [
            Stage("parity", (*me, "--parity", "--smoke"), 300, 10),
            Stage("model_step tiny", ("-m", "benchmarks.model_step", "--smoke",
                                      "--samples_per_row", "2"), 300, 10),
            Stage("rollout tiny", ("-m", "benchmarks.rollout_throughput", "--smoke", "--skip_hf"),
                  300, 10),
            Stage("train_throughput tiny", ("-m", "benchmarks.train_throughput", "--smoke",
                                            "--layouts", "packed", "--repeats", "2",
                                            "--memory_lens", ""), 300, 10),
        ]
    # 4k-token rows of 4 samples each. Rows per step (and per micro-batch) keep the compiled
    # temporaries without remat near 30 GiB (measured on CPU: 62 GiB at 8 rows of the 0.5B, 68 at
    # 4 of the 1.5B), so an 80 GB card fits them too.
    step = {"qwen2.5-0.5b": "4", "qwen2.5-1.5b": "2"}
    out = [Stage("parity", (*me, "--parity"), 150, 30)]
    out += [Stage(f"model_step {p}", ("-m", "benchmarks.model_step", "--preset", p,
                                      "--batch", step[p], "--seq_len", "4096",
                                      "--samples_per_row", "4", "--dtype", "bfloat16",
                                      "--steps", "10", "--warmup", "2"), 180, 45)
            for p in PRESETS[:1]]
    out.append(Stage("rollout", ("-m", "benchmarks.rollout_throughput", "--presets",
                                 ",".join(PRESETS), "--batches", "64,256", "--skip_hf",
                                 "--dtype", "bfloat16", "--new_tokens", "256",
                                 "--steps_per_sync", "32"), 240, 60))
    out += [Stage(f"model_step {p}", ("-m", "benchmarks.model_step", "--preset", p,
                                      "--batch", step[p], "--seq_len", "4096",
                                      "--samples_per_row", "4", "--dtype", "bfloat16",
                                      "--steps", "10", "--warmup", "2"), 180, 45)
            for p in PRESETS[1:]]
    out += [Stage(f"train_throughput {p}", ("-m", "benchmarks.train_throughput", "--preset", p,
                                            "--samples", "64", "--max_len", "4096",
                                            "--prompt_len", "512", "--dtype", "bfloat16",
                                            "--remat", "none", "--micro_rows", step[p],
                                            "--layouts", "packed", "--repeats", "3",
                                            "--memory_lens", ""), 240, 60)
            for p in PRESETS]
    return out


# ------------------------------------------------------------------------------------------------
# Stage 1: correctness on the accelerator.

def _max_err(a, b) -> float:
    import numpy as np
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def attention_parity(smoke: bool) -> dict[str, Any]:
    """The `auto` attention kernel vs dense: packed rows (padding, several samples), GQA, outputs
    and q/k/v gradients in float32 (highest matmul precision) and bfloat16."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dapo_jax.models import attention as attn

    impl = attn.resolve_attention("auto")
    b, t, h, kvh, hd = (2, 200, 4, 2, 16) if smoke else (2, 1000, 14, 2, 64)
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    seg[0, : t // 3], seg[0, t // 3:] = 1, 2  # two samples end to end
    seg[1, t - t // 7:] = 0  # right padding
    seg = jnp.asarray(seg)
    out = {"implementation": impl, "shape": [b, t, h, kvh, hd]}
    for dtype in ("float32", "bfloat16"):
        q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in
                   ((b, t, h, hd), (b, t, kvh, hd), (b, t, kvh, hd)))

        def run(name):
            def loss(q, k, v):
                o = attn.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                               implementation=name)
                return jnp.sum((o * jnp.cos(o)).astype(jnp.float32)), o
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            (_, o), g = fn(q, k, v)
            return o, g

        with jax.default_matmul_precision("highest"):
            ref_o, ref_g = run("dense")
            got_o, got_g = run(impl)
        real = np.asarray(seg) != 0
        out[dtype] = {"out_max_err": _max_err(np.asarray(got_o)[real], np.asarray(ref_o)[real]),
                      # Gradients relative to the largest reference gradient of each input.
                      "grad_max_rel_err": max(_max_err(g, r) / max(_max_err(r, 0 * r), 1e-30)
                                              for g, r in zip(got_g, ref_g)),
                      "finite": bool(np.isfinite(np.asarray(got_o, np.float32)).all()
                                     and all(np.isfinite(np.asarray(g, np.float32)).all()
                                             for g in got_g))}
    # Loose enough for TF32 dots (the GPU kernel's float32 default) and bf16's 8-bit mantissa, tight
    # enough that a wrong mask or a dropped block (errors of order 1) fails.
    limits = {"float32": (1e-2, 1e-2), "bfloat16": (0.1, 0.1)}
    out["ok"] = all(out[d]["finite"] and out[d]["out_max_err"] < lo
                    and out[d]["grad_max_rel_err"] < lg for d, (lo, lg) in limits.items())
    return out


def engine_parity(smoke: bool) -> dict[str, Any]:
    """Paged vs dense engine on a tiny random model: greedy and sampled tokens, log-probs, and a
    pool too small for the batch (preemption) giving the same samples."""
    import numpy as np

    from dapo_jax import models
    from dapo_jax.sampler import RolloutDriver, RolloutRequest, SamplingParams, build_engine

    cfg = models.preset("tiny")
    params = models.init_model(cfg, seed=1).params()
    rng = np.random.default_rng(0)
    reqs = [RolloutRequest([int(x) for x in rng.integers(3, cfg.vocab_size, n)], n=3,
                           max_new_tokens=m)
            for n, m in zip((5, 9, 3, 12, 7, 16, 1), (14, 30, 6, 20, 32, 25, 9))]

    def generate(kv_cache, sampling, pool=0):
        eng = build_engine(cfg, kv_cache=kv_cache, kv_pool_tokens=pool, kv_page_size=4,
                           max_concurrent_decodes=4, max_prefill_length=16, max_target_length=48,
                           stop_token_ids=[2])
        drv = RolloutDriver(eng, params, steps_per_sync=4, progress=False, sampling=sampling)
        return drv.generate(reqs, seed=4)

    out = {}
    cases = {"greedy": (SamplingParams(greedy=True), 0),
             "sampled": (SamplingParams(temperature=1.0), 0),
             "sampled, small pool": (SamplingParams(temperature=1.0), 64)}
    for name, (sampling, pool) in cases.items():
        want = generate("dense", sampling)
        got = generate("paged", sampling, pool)
        pairs = [(x, y) for a, b in zip(got.samples, want.samples) for x, y in zip(a, b)]
        same = sum(x.tokens.tolist() == y.tokens.tolist() for x, y in pairs)
        lp = max((_max_err(x.logprobs, y.logprobs) for x, y in pairs
                  if x.tokens.tolist() == y.tokens.tolist()), default=0.0)
        out[name] = {"samples": len(pairs), "identical": same, "logprob_max_err": lp,
                     "preemptions": int(got.stats["preemptions"])}
    out["ok"] = all(v["identical"] == v["samples"] and v["logprob_max_err"] < 1e-3
                    for v in out.values()) and out["sampled, small pool"]["preemptions"] > 0
    return out


def parity(smoke: bool) -> dict[str, Any]:
    """Stage 1: both parity checks on this process's backend."""
    import jax

    from benchmarks import common

    # Full float32 matmuls (a GPU's default is TF32): the two engines' logits then agree to ~1e-6,
    # so a near-tie flipping a greedy token cannot pass for a bug.
    jax.config.update("jax_default_matmul_precision", "highest")
    return {"benchmark": "parity", "environment": common.environment(),
            "attention": attention_parity(smoke), "engine": engine_parity(smoke)}


def format_parity(r: dict[str, Any]) -> str:
    """The parity stage's report."""
    a, e = r["attention"], r["engine"]
    lines = [f"## parity on {r['environment']['backend']} ({r['environment']['device_kind']})", "",
             f"attention {a['implementation']!r} vs dense, shape [B, T, H, K, hd] = {a['shape']}:"]
    for dt in ("float32", "bfloat16"):
        lines.append(f"- {dt}: max |out - ref| {a[dt]['out_max_err']:.2e}, max |grad - ref| "
                     f"{a[dt]['grad_max_rel_err']:.2e} (relative), finite {a[dt]['finite']}")
    lines.append("paged vs dense engine (tiny model):")
    for name, v in e.items():
        if name != "ok":
            lines.append(f"- {name}: {v['identical']}/{v['samples']} samples identical, log-prob "
                         f"max error {v['logprob_max_err']:.2e}, {v['preemptions']} preemptions")
    lines.append(f"attention ok: {a['ok']}; engine ok: {e['ok']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The driver.

def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    """[check, goal, result, note] rows for the summary table from one stage's JSON result."""
    bench = r.get("benchmark")
    if bench == "parity":
        a, e = r["attention"], r["engine"]
        return [[f"{name}: attention {a['implementation']} vs dense", "equal", str(a["ok"]),
                 f"f32 out err {a['float32']['out_max_err']:.1e}, "
                 f"grad rel err {a['float32']['grad_max_rel_err']:.1e}"],
                [f"{name}: paged vs dense engine", "identical", str(e["ok"]),
                 f"{sum(v['identical'] for k, v in e.items() if k != 'ok')} samples"]]
    if bench == "model_step":
        c = r["config"]
        published = r["peaks"][-1]["ratio"]
        rows = f"{c['batch']}x{c['seq_len']} ({c['samples_per_row']}/row)"
        return [[f"model_step {c['preset']} {rows}",
                 f"MFU >= {GOAL_MFU:.0%}", _pct(published),
                 f"{r['tokens_per_s']:.0f} tok/s, {r['achieved_flops'] / 1e12:.1f} TFLOP/s"]]
    if bench == "rollout_throughput":
        return [[f"decode {x['preset']} batch {x['batch']}", f"roofline >= {GOAL_ROOFLINE:.0%}",
                 _pct(x["roofline_fraction"]),
                 f"{x['ours']['decode_tokens_per_s']:.0f} decode tok/s, "
                 f"{x['ours']['ms_per_step']:.2f} ms/step"] for x in r["rows"]]
    if bench == "train_throughput":
        c = r["config"]
        return [[f"train_throughput {c['preset']} {layout} {x['row_length']}-token rows",
                 f"MFU >= {GOAL_MFU:.0%}", _pct(x.get("mfu_published")),
                 f"{x['useful_tokens_per_s']:.0f} useful tok/s, fill {x.get('fill', 1.0):.2f}"]
                for layout, x in r["results"].items()]
    return [[name, "", "?", f"unknown result {bench!r}"]]


def run_stage(stage: Stage, timeout_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Runs one stage's process, its output streamed to `log` as it comes; returns its JSON
    result, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, *stage.argv, "--json", str(result_path)]
        log(f"\n### {stage.name} (limit {timeout_s:.0f} s)\n$ {' '.join(cmd[1:])}\n")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                lines.append(line)
                log(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
            status = "ok" if code == 0 else f"exit status {code}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"timed out after {timeout_s:.0f} s"
        reader.join(timeout=10)
        seconds = time.perf_counter() - t0
        log(f"[{stage.name}: {status}, {seconds:.0f} s]\n")
        result = json.loads(result_path.read_text()) if result_path.exists() else None
    if status != "ok" and result is not None:
        status += " (after writing its result)"
    tail = "".join(lines[-3:]).strip()
    return {"stage": stage.name, "status": status, "seconds": seconds, "result": result,
            "error": None if status == "ok" else tail}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the stages in order within the budget; writes log.txt, results.json and summary.md."""
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "log.txt", "w")

    def log(text: str) -> None:
        print(text, end="" if text.endswith("\n") else "\n", flush=True)
        log_file.write(text if text.endswith("\n") else text + "\n")
        log_file.flush()

    selected = [s for s in stages(args.smoke)
                if not args.only or any(s.name.startswith(o) for o in args.only)]
    if not selected:
        raise SystemExit(f"--only {','.join(args.only)} selects no stage; stages: "
                         + ", ".join(s.name for s in stages(args.smoke)))
    deadline = time.perf_counter() + args.budget_s
    results = []
    for stage in selected:
        left = deadline - time.perf_counter()
        if left < stage.min_s:
            log(f"\n### {stage.name}: skipped, {left:.0f} s of the {args.budget_s:.0f} s budget "
                f"left and it needs about {stage.min_s:.0f} s (run it alone with --only)\n")
            results.append({"stage": stage.name, "status": "skipped (budget)", "seconds": 0.0,
                            "result": None, "error": None})
            continue
        results.append(run_stage(stage, min(stage.timeout_s, left), log))
    rows = []
    for x in results:
        if x["result"] is not None:
            rows += summary_rows(x["stage"], x["result"])
        if x["status"] != "ok":
            error = (x["error"] or "").replace("\n", " / ")[-160:]
            rows.append([x["stage"], "", x["status"], error])
    from benchmarks import common
    env = next((x["result"]["environment"] for x in results if x["result"]), None)
    head = (f"# accelerator checks on {env['backend']} ({env['device_kind']}, jax {env['jax']})"
            if env else "# accelerator checks (no stage produced a result)")
    summary = "\n".join([head, "", common.markdown_table(["check", "goal", "result", "note"], rows),
                         "", "Stage times: " + ", ".join(f"{x['stage']} {x['seconds']:.0f} s"
                                                         for x in results)])
    log("\n" + summary)
    (out_dir / "summary.md").write_text(summary + "\n")
    payload = {"benchmark": "accelerator_checks", "smoke": args.smoke, "stages": results,
               "summary_rows": rows}
    common.write_json(out_dir / "results.json", payload)
    log_file.close()
    return payload


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="accelerator_checks",
                   help="folder for log.txt, results.json and summary.md")
    p.add_argument("--budget_s", type=float, default=420,
                   help="wall-clock budget for all stages; a stage that would not fit is skipped")
    p.add_argument("--only", default="", help="comma-separated stage-name prefixes to run")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the wiring anywhere")
    p.add_argument("--parity", action="store_true", help="run only the parity stage, in-process")
    p.add_argument("--json", default=None, metavar="PATH", help="(--parity) write its result here")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if args.budget_s <= 0:
        p.error(f"--budget_s must be > 0, got {args.budget_s}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the parity stage (--parity) or every stage; returns the results."""
    args = parse_args(argv)
    if args.parity:
        from benchmarks import common
        result = parity(args.smoke)
        print(format_parity(result))
        if args.json:
            common.write_json(args.json, result)
        if not (result["attention"]["ok"] and result["engine"]["ok"]):
            raise SystemExit("parity failed: the numbers of later stages would be meaningless")
        return result
    return run_all(args)


if __name__ == "__main__":
    main(sys.argv[1:])
