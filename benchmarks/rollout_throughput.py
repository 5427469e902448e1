"""Rollout throughput: generated tokens/s of our Engine + RolloutDriver against transformers `generate`.

Both engines sample (temperature 1, top-p 1, no top-k) from IDENTICAL weights: a random transformers
Qwen2 model is written with `save_pretrained` and loaded back with `models.load_pretrained`. Both get
the same random prompts and must generate exactly `--new_tokens` tokens per sequence (EOS is disabled
in transformers and our stop id is one the model cannot produce; lengths are checked). The batch is
the number of sequences decoded concurrently (our decode slots; transformers' batch). Warm-up runs
(compilation for us) come first and are not timed.

On GPU/TPU the table also gives the HBM-bandwidth roofline of a decode step (parameters + KV cache
read once per step) and the fraction of it our decode loop reaches.

    python -m benchmarks.rollout_throughput                       # tiny + 0.5B, batch 16 and 64, CPU
    python -m benchmarks.rollout_throughput --presets qwen2.5-0.5b --batches 64,256 --skip_hf \\
        --dtype bfloat16                                          # GPU/TPU roofline
    python -m benchmarks.rollout_throughput --presets qwen2.5-0.5b --samples_per_prompt 16  # DAPO groups
    python -m benchmarks.rollout_throughput --smoke
    python -m benchmarks.rollout_throughput --paged_only     # paged vs dense KV cache, (a)-(c) below
    python -m benchmarks.rollout_throughput --quick          # the paged sections at a toy size

The paged-vs-dense sections (`--paged` adds them to the table above, `--paged_only` runs only them):
(a) decode ms/step at each `--step_targets` max_target_length for the same real lengths (a dense
cache reads every slot's whole row each step; the paged one reads the pages in use); (b) a
DAPO-shaped rollout, `--dapo_prompts` x `--dapo_samples` samples whose lengths are drawn from a
lognormal with mean `--dapo_max_new` / 4 (per-request max_new_tokens; the stop id is outside the
vocabulary, so every sample runs to its budget), tokens/s of both caches; (c) their KV memory and
how many samples fit at once in the dense cache's memory; (p) prefill of `--prefill_prompts` prompts
with lengths uniform in [`--prefill_min_len`, `--prefill_max_len`]: one call per prompt padded to its
power-of-two bucket (the dense engine, and the paged one before packing) against packed rows
(`PagedEngine.prefill_many`), tokens computed and prompt tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import numpy as np

from benchmarks import common
from configs.base import get_base_config
from dapo_jax import experiment, models
from dapo_jax.models.config import DTYPES, ModelConfig
from dapo_jax.runtime.devices import device_spec
from dapo_jax.sampler import (DECODE_LAYOUT_CHOICES, KV_CACHE_CHOICES, RolloutDriver,
                              RolloutRequest, SamplingParams, build_engine, kv_pool_plan)
from dapo_jax.sampler.paged_cache import page_bytes

SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, greedy=False)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COLUMNS = ["preset", "batch", "samples / prompt", "HF tok/s", "ours tok/s", "ours / HF", "ours decode tok/s",
           "ours ms/step", "compute-ideal ms/step", "HBM roofline tok/s", "ours / roofline"]


def _csv(kind):
    def parse(text: str) -> list:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        return items
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring for example invocations)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", type=_csv(str), default=["tiny", "qwen2.5-0.5b"],
                   help="comma-separated model presets (shapes; weights are random)")
    p.add_argument("--batches", type=_csv(int), default=[16, 64],
                   help="comma-separated numbers of sequences decoded concurrently")
    p.add_argument("--prompt_len", type=int, default=64, help="tokens per random prompt")
    p.add_argument("--samples_per_prompt", type=int, default=1,
                   help="sequences per prompt (DAPO: 16); a batch is batch / this many prompts. "
                        "transformers: num_return_sequences; ours: one prefill per prompt")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="our matmul/activation dtype")
    p.add_argument("--cache_dtype", default=None, choices=DTYPES,
                   help="our KV-cache dtype (default: --dtype)")
    p.add_argument("--steps_per_sync", type=int, default=8, help="our decode steps per host sync")
    p.add_argument("--decode_layout", default="auto", choices=DECODE_LAYOUT_CHOICES,
                   help="our weight layout (config rollout.decode_layout); auto = per-layer weights, "
                        "[out, in] kernels on CPU only")
    p.add_argument("--skip_hf", action="store_true",
                   help="time only our engine (e.g. on GPU/TPU, where CPU transformers is no baseline)")
    p.add_argument("--matmul_n", type=int, default=None,
                   help="side of the matmul measuring the compute peak (default 2048 CPU, 8192 else)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, batch 4, 8-token prompts, 8 new tokens: runs in seconds")
    p.add_argument("--kv_cache", default="paged", choices=KV_CACHE_CHOICES,
                   help="our KV cache in the main table (config rollout.kv_cache)")
    p.add_argument("--kv_page_size", type=int, default=16, help="tokens per page (paged cache)")
    p.add_argument("--paged", action="store_true", help="also run the paged-vs-dense sections")
    p.add_argument("--paged_only", action="store_true", help="run only the paged-vs-dense sections")
    p.add_argument("--paged_preset", default=None,
                   help="model shape of the paged sections (default: qwen2.5-0.5b on GPU/TPU; on "
                        "CPU tiny, whose small matmuls leave attention its real share of a step)")
    p.add_argument("--paged_sections", type=_csv(str), default=["a", "b", "p"],
                   help="which paged sections to run: a (decode step), b (DAPO rollout; c comes "
                        "with it), p (packed prefill)")
    p.add_argument("--prefill_prompts", type=int, default=None,
                   help="(p): prompts (default 32 on CPU, 256 on GPU/TPU)")
    p.add_argument("--prefill_min_len", type=int, default=32, help="(p): shortest prompt")
    p.add_argument("--prefill_max_len", type=int, default=512,
                   help="(p): longest prompt (also max_prefill_length)")
    p.add_argument("--prefill_row_tokens", type=int, default=2048,
                   help="(p): tokens per packed prefill row")
    p.add_argument("--step_targets", type=_csv(int), default=[128, 8192],
                   help="(a): max_target_length values, the first one the baseline")
    p.add_argument("--step_batch", type=int, default=16, help="(a): slots decoding at once")
    p.add_argument("--step_new_tokens", type=int, default=64, help="(a): decode steps timed")
    p.add_argument("--dapo_prompts", type=int, default=None,
                   help="(b): prompts (default 16 on GPU/TPU, 8 on CPU to finish in minutes)")
    p.add_argument("--dapo_samples", type=int, default=16, help="(b): samples per prompt")
    p.add_argument("--dapo_max_new", type=int, default=4096,
                   help="(b): max response length; mean length is a quarter of it")
    p.add_argument("--dapo_slots", type=int, default=64, help="(b): decode slots of both engines")
    p.add_argument("--quick", action="store_true",
                   help="only the paged sections, tiny preset, short lengths: runs in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.batches, args.prompt_len, args.new_tokens = ["tiny"], [4], 8, 8
        args.steps_per_sync, args.matmul_n = 4, 256
    if args.quick:
        args.paged_only, args.paged_preset, args.prompt_len, args.steps_per_sync = True, "tiny", 8, 4
        args.step_targets, args.step_batch, args.step_new_tokens = [32, 256], 4, 8
        args.dapo_prompts, args.dapo_samples, args.dapo_max_new, args.dapo_slots = 2, 4, 64, 4
        args.prefill_prompts, args.prefill_min_len, args.prefill_max_len = 6, 3, 40
        args.prefill_row_tokens = 64
        args.matmul_n = 256
    on_cpu = jax.default_backend() == "cpu"
    args.paged_preset = args.paged_preset or ("tiny" if on_cpu else "qwen2.5-0.5b")
    args.dapo_prompts = args.dapo_prompts or (8 if on_cpu else 16)
    args.prefill_prompts = args.prefill_prompts or (32 if on_cpu else 256)
    if not 1 <= args.prefill_min_len <= args.prefill_max_len:
        p.error(f"--prefill_min_len ({args.prefill_min_len}) must be in [1, --prefill_max_len "
                f"({args.prefill_max_len})]")
    if min(args.step_targets) <= args.prompt_len + args.step_new_tokens - 1:
        p.error(f"--step_targets must all exceed --prompt_len + --step_new_tokens - 1 "
                f"({args.prompt_len + args.step_new_tokens - 1})")
    for name in ("prompt_len", "new_tokens", "steps_per_sync"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        p.error(f"--batches must all be >= 1, got {args.batches}")
    if args.samples_per_prompt < 1 or any(b % args.samples_per_prompt for b in args.batches):
        p.error(f"--samples_per_prompt ({args.samples_per_prompt}) must be >= 1 and divide every "
                f"batch in --batches {args.batches}")
    for name in args.presets:
        try:
            models.preset(name)
        except ValueError as e:
            p.error(str(e))
    if args.matmul_n is None:
        args.matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
    args.cache_dtype = args.cache_dtype or args.dtype
    return args


def decode_bytes_per_step(cfg: ModelConfig, batch: int, cache_len: float, param_bytes: int,
                          cache_dtype: str) -> int:
    """HBM bytes one decode step must read: every parameter once plus K and V of `cache_len`
    positions per slot (`kv_tokens_read`).

    `param_bytes` is the size of the weights as the engine holds them.
    """
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * _BYTES[cache_dtype]
    return int(param_bytes) + int(round(kv))


def kv_tokens_read(kv_cache: str, prompt_len: int, new_tokens: int, page_size: int) -> float:
    """K/V positions per slot one decode step must read, averaged over the `new_tokens` steps.

    Dense: the whole cache (prompt_len + new_tokens), which that engine scores every step. Paged:
    only the pages that hold the sample so far, ceil((prompt_len + t + 1) / page_size) pages at
    step t; our kernel may read more (a power-of-two block of pages), so this is the stricter bound.
    """
    if kv_cache == "dense":
        return float(prompt_len + new_tokens)
    t = np.arange(new_tokens)
    return float(np.mean(-(-(prompt_len + t + 1) // page_size) * page_size))


def roofline_tokens_per_s(bytes_per_step: int, batch: int, hbm_bytes_per_s: float) -> float:
    """Tokens/s if a decode step took exactly its bytes / bandwidth: bandwidth / bytes * batch."""
    return hbm_bytes_per_s / bytes_per_step * batch


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    """[batch, length] uniformly random token ids (the same prompts go to both engines)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length), dtype=np.int64)


def build_hf_checkpoint(cfg: ModelConfig, directory: str, seed: int):
    """A random float32 transformers model with `cfg`'s shape, EOS disabled, saved to `directory`."""
    import torch
    import transformers

    hf = models.to_hf_config(cfg)
    for key in ("model_type", "architectures", "torch_dtype"):
        hf.pop(key, None)
    hf.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    # Attribute access imports only the one architecture (the other costs seconds of imports).
    if cfg.architecture == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf))
    model = model.float().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    return model


def run_hf(model, prompts: np.ndarray, new_tokens: int, seed: int, samples_per_prompt: int = 1
           ) -> dict[str, float]:
    """Times one transformers `generate` call (plain sampling) after a short warm-up call."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None,
                  pad_token_id=0, num_return_sequences=samples_per_prompt)
    ids = torch.as_tensor(prompts)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        warm = min(len(prompts), 4)
        model.generate(ids[:warm], attention_mask=mask[:warm], max_new_tokens=4, **kwargs)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kwargs)
        wall = time.perf_counter() - t0
    generated = out.shape[1] - ids.shape[1]
    if generated != new_tokens or out.shape[0] != len(prompts) * samples_per_prompt:
        raise RuntimeError(f"transformers generated {generated} tokens per sequence, not {new_tokens}: "
                           "EOS was not disabled, so the comparison would be unfair")
    total = new_tokens * out.shape[0]
    return {"wall_s": wall, "tokens": total, "tokens_per_s": total / wall,
            "ms_per_step": 1000 * wall / new_tokens}


def run_ours(cfg: ModelConfig, params: dict, prompts: np.ndarray, new_tokens: int,
             args: argparse.Namespace) -> dict[str, float]:
    """Times one RolloutDriver.generate over all prompts after a compile warm-up.

    Each prompt is one request of `--samples_per_prompt` samples: one prefill, that many slots.
    """
    n = args.samples_per_prompt
    batch, prompt_len = len(prompts) * n, prompts.shape[1]
    # The engine the trainer would build (experiment.make_engine) for these shapes, on one device.
    config = get_base_config()
    config.data.max_prompt_length, config.data.max_response_length = prompt_len, new_tokens
    config.rollout.max_concurrent_decodes = batch
    config.rollout.cache_dtype = args.cache_dtype or cfg.dtype
    config.rollout.decode_layout = args.decode_layout
    config.rollout.kv_cache, config.rollout.kv_page_size = args.kv_cache, args.kv_page_size
    mesh = models.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    engine = experiment.make_engine(config, cfg, mesh, pad_id=0,
                                    stop_ids=[cfg.vocab_size])  # outside the vocabulary: never sampled
    driver = RolloutDriver(engine, params, steps_per_sync=args.steps_per_sync, progress=False,
                           sampling=SAMPLING)
    requests = [RolloutRequest([int(t) for t in p], n=n, max_new_tokens=new_tokens) for p in prompts]
    t0 = time.perf_counter()
    # Compiles the prefill bucket, the one-slot insert, the key derivation and the decode loop: the
    # shapes are the same as in the timed run, only the token budget (a runtime value) is smaller.
    driver.generate([RolloutRequest(r.prompt, n, args.steps_per_sync) for r in requests],
                    seed=args.seed + 1)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = driver.generate(requests, seed=args.seed)
    wall = time.perf_counter() - t0
    lengths = {s.length for samples in result.samples for s in samples}
    reasons = {s.finish_reason for samples in result.samples for s in samples}
    if lengths != {new_tokens} or reasons != {"length"}:
        raise RuntimeError(f"our engine generated lengths {sorted(lengths)} ({sorted(reasons)}), "
                           f"not exactly {new_tokens}: the comparison would be unfair")
    st = result.stats
    total = new_tokens * batch
    leaves = jax.tree.leaves(driver.params)
    return {"param_bytes": sum(x.nbytes for x in leaves),
            "param_dtypes": sorted({str(x.dtype) for x in leaves}), "wall_s": wall, "tokens": total,
            "decode_layout": engine.decode_layout.name,
            "tokens_per_s": total / wall, "warmup_s": warmup_s,
            "prefill_s": st["prefill_s"], "insert_s": st["insert_s"], "decode_s": st["decode_s"],
            "decode_steps": st["decode_steps"], "decode_tokens_per_s": st["decode_tokens_per_s"],
            "ms_per_step": 1000 * st["decode_s"] / st["decode_steps"]}


# ------------------------------------------------------------------------------------------------
# Paged vs dense KV cache.

PAGED_STEP_COLUMNS = ["kv_cache", "max_target_length", "ms/step (fastest call)", "vs first target",
                      "ms/step (median call)", "vs first target (median)"]
PAGED_DAPO_COLUMNS = ["kv_cache", "samples", "tokens", "wall s", "prefill + insert s", "tok/s",
                      "decode tok/s", "vs dense", "preemptions"]
PAGED_MEMORY_COLUMNS = ["kv_cache", "KV allocated MiB", "KV peak in use MiB",
                        "samples at once in the dense budget"]
PREFILL_COLUMNS = ["prefill", "calls", "prompt tokens", "tokens computed", "padding", "s",
                   "prompt tok/s", "vs one per prompt"]


def _paged_engine(cfg: ModelConfig, kv_cache: str, slots: int, prompt_len: int, target: int,
                  args: argparse.Namespace):
    return build_engine(cfg, kv_cache=kv_cache, kv_page_size=args.kv_page_size,
                        max_concurrent_decodes=slots, max_prefill_length=prompt_len,
                        max_target_length=target, stop_token_ids=[cfg.vocab_size],
                        cache_dtype=args.cache_dtype, decode_layout=args.decode_layout)


def decode_step_ms(cfg: ModelConfig, params: Any, kv_cache: str, target: int,
                   args: argparse.Namespace) -> dict[str, float]:
    """(a) ms per decode step of `--step_batch` slots at max_target_length `target`: prompts of
    `--prompt_len` tokens, `--step_new_tokens` timed steps after a compile warm-up, timed per
    `generate` call. Returns the fastest and the median call (per step): on a shared machine the
    fastest is the program's cost, the median what a run sees."""
    batch, steps = args.step_batch, args.steps_per_sync
    eng = _paged_engine(cfg, kv_cache, batch, args.prompt_len, target, args)
    params = eng.load_params(params)
    prompts = random_prompts(cfg.vocab_size, batch, args.prompt_len, args.seed)
    prefixes = [eng.prefill_prefix(params, *eng.pad_tokens(list(p))) for p in prompts]

    def fill():
        state = eng.init_decode_state()
        for i, prefix in enumerate(prefixes):
            state = eng.insert(prefix, state, i, max_new_tokens=args.step_new_tokens)
        return jax.block_until_ready(state)

    def decode(state, total):
        times = []
        for _ in range(-(-total // steps)):
            t0 = time.perf_counter()
            state, _ = eng.reserve(state, steps)
            state, _ = eng.generate(params, state, num_steps=steps, sampling=SAMPLING)
            times.append(1000 * (time.perf_counter() - t0) / steps)
        return times

    decode(fill(), steps)  # compiles
    times = decode(fill(), args.step_new_tokens)
    return {"min": float(np.min(times)), "median": float(np.median(times))}


def dapo_requests(vocab: int, args: argparse.Namespace) -> list[RolloutRequest]:
    """(b) `--dapo_prompts` x `--dapo_samples` requests of one sample each (a prompt repeated per
    sample, so each can get its own length), lengths lognormal with mean dapo_max_new / 4."""
    rng = np.random.default_rng(args.seed)
    sigma = 1.0
    mu = np.log(args.dapo_max_new / 4) - sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, args.dapo_prompts * args.dapo_samples)),
                      1, args.dapo_max_new).astype(int)
    prompts = random_prompts(vocab, args.dapo_prompts, args.prompt_len, args.seed)
    return [RolloutRequest([int(t) for t in prompts[i // args.dapo_samples]], n=1,
                           max_new_tokens=int(m)) for i, m in enumerate(lengths)]


def dapo_rollout(cfg: ModelConfig, params: Any, kv_cache: str, requests: list[RolloutRequest],
                 args: argparse.Namespace) -> dict[str, Any]:
    """(b) One timed RolloutDriver.generate of `requests` after a short warm-up (compiles)."""
    target = args.prompt_len + args.dapo_max_new
    eng = _paged_engine(cfg, kv_cache, args.dapo_slots, args.prompt_len, target, args)
    driver = RolloutDriver(eng, params, steps_per_sync=args.steps_per_sync, progress=False,
                           sampling=SAMPLING)
    # The same requests with short budgets: compiles every shape the timed run uses.
    driver.generate([RolloutRequest(r.prompt, 1, args.steps_per_sync) for r in requests],
                    seed=args.seed + 1)
    t0 = time.perf_counter()
    result = driver.generate(requests, seed=args.seed)
    wall = time.perf_counter() - t0
    got = [s.length for ss in result.samples for s in ss]
    if got != [r.max_new_tokens for r in requests]:
        raise RuntimeError(f"{kv_cache} engine did not generate the requested lengths")
    st = result.stats
    peak = (st["kv_peak_pages"] * page_bytes(cfg, args.kv_page_size, args.cache_dtype)
            if kv_cache == "paged" else eng.kv_cache_bytes)
    return {"kv_cache": kv_cache, "samples": len(got), "tokens": int(sum(got)), "wall_s": wall,
            "tokens_per_s": sum(got) / wall, "decode_tokens_per_s": st["decode_tokens_per_s"],
            "prefill_insert_s": st["prefill_s"] + st["insert_s"],
            "preemptions": int(st.get("preemptions", 0)), "kv_allocated_bytes": eng.kv_cache_bytes,
            "kv_peak_bytes": int(peak)}


def prefill_comparison(cfg: ModelConfig, params: Any, args: argparse.Namespace
                       ) -> list[dict[str, Any]]:
    """(p) The same prompts prefilled one per call at its bucket (`Engine.prefill_many`) and packed
    into rows (`PagedEngine.prefill_many`); each timed after an untimed pass that compiles."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.prefill_min_len, args.prefill_max_len + 1, args.prefill_prompts)
    prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, n)] for n in lengths]
    rows = []
    for name, kv_cache in (("one per prompt", "dense"), ("packed", "paged")):
        eng = build_engine(cfg, kv_cache=kv_cache, kv_page_size=args.kv_page_size,
                           prefill_row_tokens=args.prefill_row_tokens, max_concurrent_decodes=1,
                           max_prefill_length=args.prefill_max_len,
                           max_target_length=args.prefill_max_len + 1,
                           stop_token_ids=[cfg.vocab_size], cache_dtype=args.cache_dtype,
                           decode_layout=args.decode_layout)
        weights = eng.load_params(params)
        jax.block_until_ready(eng.prefill_many(weights, prompts))  # compiles every bucket
        before = eng.prefill_computed_tokens
        t0 = time.perf_counter()
        prefixes = jax.block_until_ready(eng.prefill_many(weights, prompts))
        wall = time.perf_counter() - t0
        calls = len(prefixes) if kv_cache == "dense" else len({id(p["row"]) for p in prefixes})
        computed = eng.prefill_computed_tokens - before
        rows.append({"prefill": name, "calls": calls, "prompt_tokens": int(lengths.sum()),
                     "computed_tokens": int(computed), "wall_s": wall,
                     "tokens_per_s": float(lengths.sum()) / wall})
        print(f"[rollout_throughput] (p) {name}: {wall:.2f} s, {computed} tokens computed",
              file=sys.stderr, flush=True)
        del prefixes, weights, eng
    return rows


def run_paged(args: argparse.Namespace) -> dict[str, Any]:
    """Sections (a)-(c): paged vs dense KV cache at `--paged_preset`'s shape, random weights."""
    cfg = models.preset(args.paged_preset).replace(dtype=args.dtype)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings,
                                                  max(args.step_targets),
                                                  args.prompt_len + args.dapo_max_new))
    params = models.init_model(cfg, seed=args.seed).params()
    steps = []
    for kv_cache in ("paged", "dense") if "a" in args.paged_sections else ():
        base = None
        for target in args.step_targets:
            ms = decode_step_ms(cfg, params, kv_cache, target, args)
            base = base or ms
            steps.append({"kv_cache": kv_cache, "max_target_length": target,
                          "ms_per_step": ms["min"], "median_ms_per_step": ms["median"],
                          "ratio": ms["min"] / base["min"],
                          "median_ratio": ms["median"] / base["median"]})
            print(f"[rollout_throughput] (a) {kv_cache} max_target_length {target}: "
                  f"{ms['min']:.2f} ms/step (median {ms['median']:.2f})", file=sys.stderr,
                  flush=True)
    prefill = prefill_comparison(cfg, params, args) if "p" in args.paged_sections else []
    if "b" not in args.paged_sections:
        return {"preset": args.paged_preset, "steps": steps, "dapo": None, "memory": None,
                "prefill": prefill}
    requests = dapo_requests(cfg.vocab_size, args)
    dapo = {}
    for kv_cache in ("dense", "paged"):
        dapo[kv_cache] = dapo_rollout(cfg, params, kv_cache, requests, args)
        print(f"[rollout_throughput] (b) {kv_cache}: {dapo[kv_cache]['tokens_per_s']:.1f} tok/s",
              file=sys.stderr, flush=True)
    # (c) The dense cache's memory as a budget: it holds dapo_slots samples of any length; a pool of
    # the same bytes holds as many samples of the mean length as its pages allow.
    target = args.prompt_len + args.dapo_max_new
    mean_len = args.prompt_len + float(np.mean([r.max_new_tokens for r in requests]))
    budget = dapo["dense"]["kv_allocated_bytes"]
    per_page = page_bytes(cfg, args.kv_page_size, args.cache_dtype)
    plan = kv_pool_plan(cfg, (budget // per_page) * args.kv_page_size, args.kv_page_size,
                        slots=10 ** 9, max_target_length=target, cache_dtype=args.cache_dtype,
                        expected_length=int(round(mean_len)))
    memory = {"budget_bytes": budget, "mean_sample_tokens": mean_len,
              "dense_samples": args.dapo_slots, "paged_samples": plan.concurrent_samples,
              "paged_samples_at_max": plan.concurrent_samples_at_max}
    return {"preset": args.paged_preset, "steps": steps, "dapo": dapo, "memory": memory,
            "speedup": dapo["paged"]["tokens_per_s"] / dapo["dense"]["tokens_per_s"],
            "prefill": prefill}


def format_paged_report(r: dict[str, Any], args: argparse.Namespace) -> str:
    """The three paged-vs-dense tables and how they were measured."""
    mib = lambda b: common.fmt(b / 2 ** 20)  # noqa: E731
    steps = [[row["kv_cache"], row["max_target_length"], common.fmt(row["ms_per_step"]),
              f"{row['ratio']:.2f}x", common.fmt(row["median_ms_per_step"]),
              f"{row['median_ratio']:.2f}x"] for row in r["steps"]]
    head = [f"## Paged vs dense KV cache ({r['preset']} shape, random weights, dtype {args.dtype}, "
            f"KV {args.cache_dtype}, pages of {args.kv_page_size} tokens)", ""]
    if steps:
        head += [f"(a) decode step, {args.step_batch} slots, {args.prompt_len}-token prompts, "
                 f"{args.step_new_tokens} new tokens each, only max_target_length changes:", "",
                 common.markdown_table(PAGED_STEP_COLUMNS, steps), ""]
    if r["prefill"]:
        base = r["prefill"][0]["tokens_per_s"]
        rows = [[x["prefill"], x["calls"], x["prompt_tokens"], x["computed_tokens"],
                 f"{x['computed_tokens'] / x['prompt_tokens'] - 1:.0%}", common.fmt(x["wall_s"]),
                 common.fmt(x["tokens_per_s"]), f"{x['tokens_per_s'] / base:.2f}x"]
                for x in r["prefill"]]
        head += [f"(p) prefill of {args.prefill_prompts} prompts, lengths uniform in "
                 f"[{args.prefill_min_len}, {args.prefill_max_len}], packed rows of up to "
                 f"{args.prefill_row_tokens} tokens:", "",
                 common.markdown_table(PREFILL_COLUMNS, rows), ""]
    d, m = r["dapo"], r["memory"]
    if d is None:
        return "\n".join(head)
    dapo = [[x["kv_cache"], x["samples"], x["tokens"], common.fmt(x["wall_s"]),
             common.fmt(x["prefill_insert_s"]), common.fmt(x["tokens_per_s"]), common.fmt(x["decode_tokens_per_s"]),
             f"{x['tokens_per_s'] / d['dense']['tokens_per_s']:.2f}x", x["preemptions"]]
            for x in (d["dense"], d["paged"])]
    memory = [["dense", mib(d["dense"]["kv_allocated_bytes"]), mib(d["dense"]["kv_peak_bytes"]),
               m["dense_samples"]],
              ["paged", mib(d["paged"]["kv_allocated_bytes"]), mib(d["paged"]["kv_peak_bytes"]),
               f"{m['paged_samples']} (mean length), {m['paged_samples_at_max']} (max length)"]]
    return "\n".join(head + [
        f"(b) DAPO-shaped rollout: {args.dapo_prompts} prompts x {args.dapo_samples} samples "
        f"(one request per sample), response lengths lognormal(sigma 1) with mean "
        f"{args.dapo_max_new // 4} clipped to [1, {args.dapo_max_new}], {args.dapo_slots} slots, "
        f"steps_per_sync {args.steps_per_sync}; paged pool = default (slots x max length):", "",
        common.markdown_table(PAGED_DAPO_COLUMNS, dapo), "",
        f"(c) KV memory of (b); budget = the dense cache ({mib(m['budget_bytes'])} MiB), mean "
        f"sample {m['mean_sample_tokens']:.0f} tokens (prompt + response):", "",
        common.markdown_table(PAGED_MEMORY_COLUMNS, memory),
    ])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every (preset, batch) pair on both engines; returns every number."""
    if args.paged_only:
        return {"benchmark": "rollout_throughput", "environment": common.environment(),
                "rows": [], "paged": run_paged(args)}
    env = common.environment()
    on_accelerator = env["backend"] != "cpu"
    spec = device_spec(env["device_kind"]) if on_accelerator else None
    peak = common.measured_matmul_flops(args.dtype, args.matmul_n)
    rows = []
    for name in args.presets:
        if args.skip_hf:
            # No baseline: random weights straight from JAX (no torch, no checkpoint round trip,
            # which costs minutes of host time at the 1.5B shape on an accelerator host).
            hf_model, cfg = None, models.preset(name).replace(dtype="float32")
            params = models.init_model(cfg, seed=args.seed).params()
        else:
            with tempfile.TemporaryDirectory(prefix="rollout_bench_") as tmp:
                hf_model = build_hf_checkpoint(models.preset(name), tmp, args.seed)
                model, cfg = models.load_pretrained(tmp, dtype="float32")
                params = model.params()
                del model
        cfg = cfg.replace(dtype=args.dtype)
        for batch in args.batches:
            n = args.samples_per_prompt
            prompts = random_prompts(cfg.vocab_size, batch // n, args.prompt_len, args.seed + batch)
            hf = None if hf_model is None else run_hf(hf_model, prompts, args.new_tokens, args.seed, n)
            ours = run_ours(cfg, params, prompts, args.new_tokens, args)
            kv_len = kv_tokens_read(args.kv_cache, args.prompt_len, args.new_tokens,
                                    args.kv_page_size)
            step_flops = batch * common.forward_flops_per_token(cfg, kv_len)
            row = {"preset": name, "batch": batch, "samples_per_prompt": n, "hf": hf, "ours": ours,
                   "ratio": None if hf is None else ours["tokens_per_s"] / hf["tokens_per_s"],
                   "decode_step_flops": step_flops,
                   "compute_ideal_ms_per_step": 1000 * step_flops / peak,
                   "kv_tokens_per_slot": kv_len,
                   "bytes_per_step": decode_bytes_per_step(cfg, batch, kv_len, ours["param_bytes"],
                                                           args.cache_dtype),
                   "roofline_tokens_per_s": None, "roofline_fraction": None}
            if spec is not None:
                roof = roofline_tokens_per_s(row["bytes_per_step"], batch, spec.hbm_bytes_per_s)
                row.update(roofline_tokens_per_s=roof,
                           roofline_fraction=ours["decode_tokens_per_s"] / roof)
            rows.append(row)
            print(f"[rollout_throughput] {name} batch {batch}: ours "
                  f"{ours['tokens_per_s']:.1f} tok/s" +
                  ("" if hf is None else f", HF {hf['tokens_per_s']:.1f} tok/s"),
                  file=sys.stderr, flush=True)
        del hf_model, params
    return {"benchmark": "rollout_throughput", "environment": env,
            "config": {k: getattr(args, k) for k in ("presets", "batches", "samples_per_prompt",
                                                     "prompt_len", "new_tokens",
                                                     "dtype", "cache_dtype", "decode_layout",
                                                     "kv_cache", "kv_page_size",
                                                     "steps_per_sync", "skip_hf", "seed")},
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
            "device_spec": None if spec is None else vars(spec),
            "measured_matmul_flops": peak, "matmul_n": args.matmul_n, "rows": rows,
            "paged": run_paged(args) if args.paged else None}


def format_report(r: dict[str, Any]) -> str:
    """One markdown table with both engines, then notes on how each column is computed."""
    env, c = r["environment"], r["config"]
    na = "n/a" if env["backend"] == "cpu" else "unknown device"

    def cell(row, key, scale=1.0):
        return common.fmt(None if row.get(key) is None else row[key] * scale)

    body = []
    for row in r["rows"]:
        hf, ours = row["hf"], row["ours"]
        roof = row["roofline_tokens_per_s"]
        body.append([
            row["preset"], row["batch"], row["samples_per_prompt"],
            "skipped" if hf is None else common.fmt(hf["tokens_per_s"]),
            common.fmt(ours["tokens_per_s"]),
            "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x",
            common.fmt(ours["decode_tokens_per_s"]), common.fmt(ours["ms_per_step"]),
            common.fmt(row["compute_ideal_ms_per_step"]),
            na if roof is None else common.fmt(roof),
            na if roof is None else f"{100 * row['roofline_fraction']:.1f}%"])
    spec = r["device_spec"]
    weights = "/".join(sorted({d for row in r["rows"] for d in row["ours"]["param_dtypes"]}))
    layouts = "/".join(sorted({row["ours"]["decode_layout"] for row in r["rows"]}))
    lines = [
        f"## rollout_throughput on {env['backend']} ({env['device_kind']}, jax {env['jax']}, "
        f"{env['cpu_count']} CPUs)", "",
        common.markdown_table(COLUMNS, body), "",
        f"Each sequence: {c['prompt_len']}-token random prompt, exactly {c['new_tokens']} sampled "
        "tokens (temperature 1, top-p 1, no top-k). tok/s = generated tokens / wall time of the whole call "
        "(prefill included, warm-up and compilation excluded). "
        + ("Every sequence has its own prompt. " if c["samples_per_prompt"] == 1 else
           f"Prompts are shared by {c['samples_per_prompt']} sequences each, as in DAPO's groups: "
           "transformers expands them (num_return_sequences) and prefills every copy; ours prefills "
           "each prompt once and inserts it into that many slots. ")
        + "Ours: "
        f"dtype {c['dtype']}, weights held in {weights} in decode layout {layouts}, "
        f"KV cache {c['kv_cache']} {c['cache_dtype']}, "
        f"steps_per_sync {c['steps_per_sync']}; transformers: float32, torch threads = cpu_count.",
        "ours decode tok/s and ms/step time only the decode loop (no prefill or insert). "
        f"compute-ideal ms/step = decode-step FLOPs / measured {c['dtype']} matmul peak "
        f"({common.fmt(r['measured_matmul_flops'] / 1e12)} TFLOP/s, n={r['matmul_n']}).",
    ]
    if spec is not None:
        lines.append(f"HBM roofline: {spec['name']} at {spec['hbm_bytes_per_s'] / 1e12:.2f} TB/s; "
                     "bytes per decode step = parameters + K/V of the positions read per slot "
                     "(dense: the whole cache; paged: the pages holding the sample so far, mean "
                     f"{r['rows'][0]['kv_tokens_per_slot']:.0f} positions); "
                     "roofline tok/s = bandwidth / bytes per step x batch, compared with decode tok/s.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the markdown report, writes JSON when asked; returns the results."""
    args = parse_args(argv)
    result = run(args)
    if result["rows"]:
        print(format_report(result))
    if result.get("paged"):
        print(format_paged_report(result["paged"], args))
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
