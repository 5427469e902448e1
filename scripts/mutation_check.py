"""Measures the test net: plants known wiring bugs one at a time in a scratch copy and runs the tests.

    .venv/bin/python scripts/mutation_check.py [--only NAME[,NAME]] [--keep]

Each mutation is a one-line change that a plausible refactor could make (the bugs an audit of the
suite found that no test caught). For every mutation the script copies the repository to a scratch
folder, applies the change there, runs the tests that should catch it with the scratch copy first on
the import path, and reports whether they failed. The working tree is never modified. A first run
without any mutation checks that those tests pass on the unmodified code, so a "caught" result means
the planted bug, and nothing else, broke them. Exits non-zero when a mutation survives.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    """A planted bug: replace `old` (must occur exactly once in `path`) by `new`."""

    name: str
    description: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "micro_batch_token_count",
        "the update divides each micro-batch by its own token count instead of the mini-batch's",
        "dapo_jax/training/update.py",
        "global_token_count=None if legacy else token_count,",
        "global_token_count=None if legacy else jnp.sum(micro[\"response_mask\"]),",
        ("tests/test_trainer_reference.py",)),
    Mutation(
        "packed_micro_batch_token_count",
        "the packed update divides each micro-batch by its own token count, not the mini-batch's",
        "dapo_jax/training/update.py",
        "loss_agg_mode=loss.loss_agg_mode, global_token_count=token_count,",
        "loss_agg_mode=loss.loss_agg_mode, global_token_count=jnp.sum(micro[\"response_mask\"]),",
        ("tests/test_trainer_reference.py",)),
    Mutation(
        "overlong_penalty_in_characters",
        "the trainer measures the soft overlong punishment in characters instead of tokens",
        "dapo_jax/training/trainer.py",
        "acc,\n                                        lengths, eos, self.shaping)",
        "acc,\n                                        np.asarray([len(s.text or '') for s in samples]),"
        " eos, self.shaping)",
        ("tests/test_trainer_reference.py",)),
    Mutation(
        "response_mask_drops_eos",
        "the response mask leaves out the last (EOS) token of every response",
        "dapo_jax/training/batching.py",
        'out["response_mask"][i, :len(resp)] = 1',
        'out["response_mask"][i, :len(resp) - 1] = 1',
        ("tests/test_trainer_reference.py",)),
    Mutation(
        "update_params_recompiles",
        "every weight swap rebuilds the engine's compiled programs (served by the persistent cache)",
        "dapo_jax/sampler/engine.py",
        "        layout.check_input(params)\n        if self._cast is None:",
        "        layout.check_input(params)\n"
        "        self._cast, self._prefill, self._insert, self._generate = None, {}, {}, {}\n"
        "        if self._cast is None:",
        ("tests/test_compile_counts.py",)),
    Mutation(
        "same_key_every_decode_step",
        "every decode step of a slot draws with the same random key",
        "dapo_jax/sampler/engine.py",
        "jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state[\"keys\"]),\n"
        "                                                state[\"generated\"])",
        "jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state[\"keys\"]),\n"
        "                                                0 * state[\"generated\"])",
        ("tests/test_sampler_randomness.py",)),
    Mutation(
        "logprob_backward_skips_last_chunk",
        "the log-prob backward loop stops one chunk early (the last scored chunk gets no gradient)",
        "dapo_jax/models/logprobs.py",
        "dh, dw = jax.lax.fori_loop(0, active, body,",
        "dh, dw = jax.lax.fori_loop(0, active - 1, body,",
        ("tests/test_logprobs.py",)),
    Mutation(
        "swiglu_backward_silu_derivative",
        "the SwiGLU backward uses sigmoid(g) for silu'(g)",
        "dapo_jax/models/swiglu.py",
        "dg = da * u * (sig * (1 + g * (1 - sig)))",
        "dg = da * u * sig",
        ("tests/test_swiglu.py",)),
    Mutation(
        "packed_prefill_own_page_offset",
        "a packed prompt's own (last) page is copied from the row without the prompt's start offset",
        "dapo_jax/sampler/paged_engine.py",
        "src.append(meta.start + n_shared * self.page_size)",
        "src.append(n_shared * self.page_size)",
        ("tests/test_paged_engine.py",)),
    Mutation(
        "segment_local_attention_skips_a_needed_block",
        "the packed prefill's attention starts each query block one key block too late",
        "dapo_jax/models/attention.py",
        "first_block = starts.reshape(b, n, block).min(axis=(0, 2)) // block  # [n]",
        "first_block = starts.reshape(b, n, block).min(axis=(0, 2)) // block + 1  # [n]",
        ("tests/test_attention.py",)),
    Mutation(
        "paged_decode_whole_blocks",
        "paged decode always reads blocks of block_tokens keys, whatever the samples' lengths",
        "dapo_jax/models/attention.py",
        "sizes = sorted({min(1 << i, largest) for i in range(largest.bit_length() + 1)})",
        "sizes = [largest]",
        ("tests/test_paged_engine.py",)),
    Mutation(
        "packed_rows_never_cut",
        "packed micro-batches keep their bucket's row length however short the samples",
        "dapo_jax/training/batching.py",
        "for cut in layout.trimmed_lengths(bucket):",
        "for cut in layout.trimmed_lengths(bucket)[-1:]:",
        ("tests/test_batching.py",)),
    Mutation(
        "paged_decode_merge_without_rescale",
        "paged decode adds a sample's later blocks to its running softmax sum without rescaling it",
        "dapo_jax/models/attention.py",
        "l = l * corr + jnp.zeros_like(l).at[row].add(l_item * w)",
        "l = l + jnp.zeros_like(l).at[row].add(l_item * w)",
        ("tests/test_paged_engine.py",)),
    Mutation(
        "model_step_counts_the_head_for_every_token",
        "MFU counts the lm head's FLOPs for prompt tokens that sequence_logprobs never projects",
        "benchmarks/model_step.py",
        "return 3.0 * (body + head * scored_tokens)",
        "return 3.0 * (body + head * float(sum(sample_lengths)))",
        ("tests/test_benchmarks_smoke.py",)),
    Mutation(
        "decode_roofline_reads_the_whole_paged_cache",
        "the paged cache's roofline counts every slot's maximum length, overstating our fraction",
        "benchmarks/rollout_throughput.py",
        'if kv_cache == "dense":',
        'if kv_cache in ("dense", "paged"):',
        ("tests/test_benchmarks_smoke.py",)),
    Mutation(
        "accelerator_checks_ignore_the_budget",
        "every accelerator stage runs whatever time is left, so the device call overruns its limit",
        "benchmarks/accelerator_checks.py",
        "if left < stage.min_s:",
        "if False:",
        ("tests/test_accelerator_checks.py"
         "::test_stages_that_do_not_fit_the_budget_are_skipped_and_named",)),
    Mutation(
        "kernel_choice_ignores_the_abstract_device",
        "kernels are chosen for this process's backend, so lowering for a TPU checks the CPU path",
        "dapo_jax/models/attention.py",
        "platform = device.platform if device is not None else jax.default_backend()",
        "platform = jax.default_backend()",
        ("tests/test_cross_lowering.py",)),
    Mutation(
        "pallas_kernels_interpreted_when_lowering_for_their_platform",
        "the Pallas GPU kernel runs in interpret mode unless this process has a GPU backend",
        "dapo_jax/models/attention.py",
        "interpret = target_platform() not in _GPU_NAMES if interpret is None else interpret",
        'interpret = jax.default_backend() != "gpu" if interpret is None else interpret',
        ("tests/test_cross_lowering.py",)),
)


def _copy_repo(dest: pathlib.Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", ".pytest_cache", "workdir", "__pycache__")
    shutil.copytree(REPO_ROOT, dest, ignore=ignore)


def _run_tests(root: pathlib.Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(root),
               # Reuse the working tree's compile cache: entries are keyed by the program, so a
               # mutated program never hits an unmutated one's entry.
               DAPO_TEST_JAX_CACHE=str(REPO_ROOT / ".pytest_cache" / "xla"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=root, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else proc.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> int:
    """Runs the baseline and every (selected) mutation; prints one line per result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; choose from "
                     f"{[m.name for m in MUTATIONS]}")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="dapo_jax_mutants_"))
    root = scratch / "repo"
    _copy_repo(root)
    survived = []
    try:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        t0 = time.time()
        code, summary = _run_tests(root, tests)
        print(f"baseline (no mutation): {summary} [{time.time() - t0:.0f}s]", flush=True)
        if code != 0:
            print("the tests fail without any mutation: fix them first", file=sys.stderr)
            return 2
        for m in chosen:
            target = root / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: the line to mutate is not in {m.path} exactly once; update "
                      f"MUTATIONS in {pathlib.Path(__file__).name}", file=sys.stderr)
                return 2
            target.write_text(original.replace(m.old, m.new))
            try:
                t0 = time.time()
                code, summary = _run_tests(root, m.tests)
            finally:
                target.write_text(original)
            caught = code != 0
            if not caught:
                survived.append(m.name)
            print(f"{m.name}: {'CAUGHT' if caught else 'SURVIVED'} ({m.description}) -> {summary} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    finally:
        if args.keep:
            print(f"scratch copy kept at {root}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(chosen) - len(survived)}/{len(chosen)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
