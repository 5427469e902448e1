"""The memory planner: XLA's per-device numbers for Qwen2.5-0.5B on 8 fake devices match closed-form
byte counts, verdicts follow the HBM size, suggestions appear when it does not fit; topology names;
the CLI sets up its own fake devices."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import pytest

from configs.base import get_base_config
from dapo_jax import plan as planner
from dapo_jax.runtime import cross_lowering
from dapo_jax.runtime.cli_errors import UserError
from dapo_jax.runtime.topology import GB, GIB, chip_grid, custom_topology, parse_topology

# Qwen2.5-0.5B by hand (config.json: vocab 151936, hidden 896, mlp 4864, 24 layers, 14 heads, 2 KV
# heads, head_dim 64, tied embeddings, QKV bias): per layer q 896*896+896, k and v 896*128+128 each,
# o 896*896, mlp 3*896*4864, two norms 2*896.
LAYER = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
QWEN_0P5B_PARAMS = 24 * LAYER + 151936 * 896 + 896
SEQ, SLOTS, MICRO, MINI = 32, 8, 8, 16


def _small_config():
    c = get_base_config()
    c.model.preset = "qwen2.5-0.5b"
    c.model.vocab_size = 151936  # the published vocabulary (not sized to the toy tokenizer)
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.max_prompt_length = SEQ // 2
    c.data.max_response_length = SEQ // 2
    c.trainer.mini_batch_size = MINI
    c.trainer.micro_batch_size = MICRO
    c.trainer.logprob_chunk_size = 16
    c.rollout.max_concurrent_decodes = SLOTS
    c.rollout.steps_per_sync = 2
    c.rollout.cache_dtype = "bfloat16"
    return c


@pytest.fixture(scope="module")
def result():
    """The default: packed token-budget micro-batches, compiled by XLA:CPU on 8 fake devices for a
    named TPU topology (8 chips x 16 GiB), so the steps are also lowered for TPU."""
    assert len(jax.devices()) >= 8
    return planner.plan(_small_config(), "v5e-8", compiler="cpu")


@pytest.fixture(scope="module")
def padded_result():
    """The padded layout: fixed micro-batches of MICRO rows, one scanned update program."""
    c = _small_config()
    c.trainer.packing = False
    return planner.plan(c, devices=8, hbm_gib=16)


def test_official_parameter_count_matches_preset():
    assert QWEN_0P5B_PARAMS == 494_032_768  # the published size of Qwen2.5-0.5B
    assert planner.model_config(_small_config()).num_params == QWEN_0P5B_PARAMS


def test_params_per_device_are_a_fsdp_eighth_of_fp32_weights(result):
    m = result.measurement
    assert m.shapes.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    expected = QWEN_0P5B_PARAMS * 4 / 8
    # Norms and biases are replicated, so slightly more than an exact eighth.
    assert expected <= m.analytic.params <= expected * 1.005
    # AdamW keeps two float32 moments per parameter, sharded like the parameter.
    assert 2 * expected <= m.analytic.opt_state <= 2 * expected * 1.005


def test_xla_train_arguments_equal_params_moments_and_minibatch(padded_result):
    m = padded_result.measurement
    assert not m.shapes.packing and m.apply is None
    minibatch = (MINI * SEQ * 2 + MINI * (SEQ // 2) * 2 + MINI) * 4 / 8  # ids, masks, lp, adv
    expected = 3 * QWEN_0P5B_PARAMS * 4 / 8 + minibatch
    assert expected <= m.train.argument_bytes <= expected * 1.005
    # Same buffers as the analytic count, up to a few scalars jit drops as unused (seq_count under
    # token-mean, the injected learning rate the step overwrites) or adds (lr).
    analytic = m.analytic.params + m.analytic.opt_state + m.analytic.minibatch
    assert abs(m.train.argument_bytes - analytic) <= 16
    # The update donates params and optimizer state, so their outputs reuse the argument buffers.
    assert m.train.alias_bytes >= m.analytic.params + m.analytic.opt_state - 16
    # The float32 gradient sum alone is another eighth of the weights in temporaries.
    assert m.train.temp_bytes >= QWEN_0P5B_PARAMS * 4 / 8


def test_packed_gradient_step_holds_params_gradient_sum_and_one_micro_batch(result):
    m = result.measurement
    s = m.shapes
    # Default budget: MICRO / 8 devices = 1 full-length row of SEQ tokens per device.
    assert s.packing and (s.token_budget, s.row_length, s.rows_per_device) == (SEQ, SEQ, 1)
    micro = 6 * s.rows_per_device * s.row_length * 4  # six int32/float32 fields per token
    assert m.analytic.minibatch == micro
    expected = 2 * QWEN_0P5B_PARAMS * 4 / 8 + micro  # float32 params + float32 gradient sum
    assert expected <= m.train.argument_bytes <= expected * 1.005
    analytic = m.analytic.params + m.analytic.grad_accumulator + m.analytic.minibatch
    assert abs(m.train.argument_bytes - analytic) <= 64
    # The gradient sum is donated: its output reuses the argument buffer.
    assert m.train.alias_bytes >= m.analytic.grad_accumulator - 16
    # The optimizer step holds params, moments and the gradient sum.
    assert m.apply.argument_bytes >= m.analytic.params + m.analytic.opt_state + m.analytic.grad_accumulator
    assert m.train_peak_bytes == max(m.train.total_bytes + m.analytic.opt_state, m.apply.total_bytes)
    report = planner.format_report(result)
    assert f"token budget {SEQ:,} tokens per device" in report


def test_decode_holds_replicated_sampler_weights_and_sharded_kv_cache(result):
    m = result.measurement
    # Sampling layout: tensor-parallel only (tensor=1 here), so every device has all weights, kept in
    # the bfloat16 compute dtype (Engine.load_params casts the float32 training weights).
    assert QWEN_0P5B_PARAMS * 2 <= m.analytic.sampler_params <= QWEN_0P5B_PARAMS * 2 * 1.001
    kv = 2 * 24 * SLOTS * SEQ * 2 * 64 * 2 / 8  # k+v, layers, slots, tokens, kv heads, hd, bf16, /8
    assert m.analytic.kv_cache == kv
    assert m.decode.argument_bytes == m.analytic.sampler_params + m.analytic.decode_state
    # What is left out as XLA:CPU's float32 round trip of the bf16 cache is at most a float32 k and v.
    assert 0 <= m.decode.cpu_only_bytes <= 2 * m.analytic.kv_cache
    # Two packed prefill rows wait between prefill and insert: K/V of 2048 + 16 positions each,
    # KV heads over tensor (1 here), replicated over data/fsdp, in the bf16 cache dtype.
    assert m.analytic.prefill_prefixes == 2 * 24 * (2048 + 16) * 2 * 2 * 64 * 2
    assert m.rollout_peak_bytes == (m.decode.total_bytes + m.analytic.prefill_prefixes
                                    + m.analytic.params + m.analytic.opt_state)


def test_sixteen_gib_fits_with_headroom_from_the_peak(result):
    assert result.verdict == "FITS" and result.fits and not result.suggestions
    hbm = 16 * GIB
    assert result.headroom == pytest.approx((hbm - result.peak_bytes) / hbm)
    assert 0 < result.peak_bytes < hbm
    m = result.measurement
    # The trainer frees the sampler's buffers before the update; the train state stays for rollouts.
    assert m.train_peak_bytes == max(m.train.total_bytes + m.analytic.opt_state,
                                     m.apply.total_bytes)
    assert result.peak_bytes == max(m.train_peak_bytes, m.rollout_peak_bytes)


def test_named_tpu_topology_lowers_both_steps_with_the_tpu_kernels(result):
    train, decode = result.measurement.lowered
    assert train.ok and decode.ok and not result.lowering_failed
    assert (train.name, train.platform, decode.name) == ("train gradient step", "tpu", "decode step")
    # Splash attention (forward with residuals, fused dK/dV backward) on TPU; head_dim 64 keeps
    # decode on the XLA page loop (the ragged kernel needs multiples of 128).
    assert set(train.kernels) == {"splash_mqa_fwd_segmented_residuals",
                                  "splash_mqa_dkv_segmented_no_residuals"}
    assert decode.kernels == ()
    report = planner.format_report(result)
    assert "lowered for TPU v5 lite (tpu, abstract data=1 fsdp=8 tensor=1 mesh" in report
    assert "train gradient step: ok in" in report and "decode step: ok in" in report
    # A custom topology names no platform: nothing to lower for.
    assert planner.assess(result.measurement, custom_topology(8, 16)).fits


def test_a_step_that_does_not_lower_is_reported_and_fails_the_plan(result):
    broken = cross_lowering.LoweredProgram("decode step", "tpu", 0.1,
                                           error="ValueError: the kernel rejects this shape")
    m = dataclasses.replace(result.measurement, lowered=(result.measurement.lowered[0], broken))
    verdict = planner.assess(m, parse_topology("v5e-8"))
    assert verdict.lowering_failed and verdict.fits  # memory and lowering are separate verdicts
    assert ("decode step: FAILED (ValueError: the kernel rejects this shape); it would fail on "
            "v5e-8 too") in planner.format_report(verdict)


@pytest.fixture(scope="module")
def tpu_result():
    """The same run at the Qwen2.5-1.5B shape (head_dim 128: the ragged paged decode kernel),
    compiled by XLA:TPU for a v5p-8 slice (4 chips), deviceless: libtpu on the CPU."""
    assert cross_lowering.libtpu_installed(), "requirements-test.txt installs libtpu"
    c = _small_config()
    c.model.preset = "qwen2.5-1.5b"
    return planner.plan(c, "v5p-8", compiler="tpu")


def test_xla_tpu_compiles_the_steps_for_the_slice_without_a_tpu(tpu_result):
    m = tpu_result.measurement
    assert m.compiler == "XLA:TPU" and m.shapes.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    # Arguments: the same buffers as the analytic count; XLA:TPU pads small minor dimensions (norms,
    # biases) to its memory tiles, which costs under 2% here.
    analytic = m.analytic.params + m.analytic.grad_accumulator + m.analytic.minibatch
    assert analytic <= m.train.argument_bytes <= analytic * 1.02
    assert m.decode.argument_bytes >= m.analytic.sampler_params + m.analytic.decode_state
    # TPUs scatter bfloat16 in place: no float32 cache copies to leave out, no second compile.
    assert m.decode.cpu_only_bytes == 0
    # The update's activations live in temporaries; the TPU compiler needs them too.
    assert m.train.temp_bytes > m.analytic.grad_accumulator / 2
    # Mosaic compiled both TPU kernels for the chip: splash attention in the update, ragged paged
    # attention in decode.
    assert tpu_result.fits and set(m.lowered[0].kernels) == {
        "splash_mqa_fwd_segmented_residuals", "splash_mqa_dkv_segmented_no_residuals"}
    assert m.lowered[1].kernels == ("ragged_paged_attention_kernel",)
    report = planner.format_report(tpu_result)
    assert "(lower + compile on XLA:TPU, deviceless: libtpu, no TPU)" in report
    assert "decode temporaries (XLA:TPU)" in report and "minus float32 copies" not in report
    assert "XLA:TPU compiled both steps ahead of time for v5p-8's 4 chips" in report


def test_xla_tpu_refusal_names_the_step_that_does_not_fit():
    c = _small_config()
    c.data.max_prompt_length = c.data.max_response_length = 1024
    c.trainer.max_tokens_per_micro_batch = 2048 * 256  # 128 full rows per chip, no remat
    c.model.remat = "none"
    with pytest.raises(planner.OutOfMemory, match=r"XLA:TPU: the train gradient step does not fit "
                       r"one chip of v5p-8 \(95.0 GiB\): RESOURCE_EXHAUSTED"):
        planner.plan(c, "v5p-8", compiler="tpu")


def test_compiler_choice_follows_the_topology_and_libtpu():
    assert planner.resolve_compiler("auto", parse_topology("v5p-8")) == "tpu"
    assert planner.resolve_compiler("auto", parse_topology("v6e-32")) == "tpu"
    assert planner.resolve_compiler("auto", parse_topology("v5p-24")) == "cpu"  # 12 chips: no grid
    assert planner.resolve_compiler("auto", parse_topology("h100-80gb-x8")) == "cpu"
    assert planner.resolve_compiler("auto", custom_topology(8, 16)) == "cpu"
    assert planner.resolve_compiler("cpu", parse_topology("v5p-8")) == "cpu"
    with pytest.raises(UserError, match="--compiler must be one of"):
        planner.resolve_compiler("xla", parse_topology("v5p-8"))
    with pytest.raises(UserError, match="not a TPU slice"):
        cross_lowering.tpu_topology_devices(parse_topology("h100-80gb-x8"))


@pytest.mark.parametrize("name,grid", [
    ("v5p-8", (2, 2, 1)), ("v5p-32", (2, 2, 4)), ("v5p-128", (4, 4, 4)), ("v4-32", (2, 2, 4)),
    ("v5e-8", (2, 4)), ("v5litepod-16", (4, 4)), ("v6e-256", (16, 16)),
])
def test_chip_grids_follow_cloud_tpu_slice_shapes(name, grid):
    assert chip_grid(parse_topology(name)) == grid


def test_too_small_hbm_does_not_fit_and_suggests_savings(result):
    small = planner.assess(result.measurement, custom_topology(8, 0.25))
    assert small.verdict == "DOES NOT FIT" and not small.fits and small.headroom < 0
    actions = {s.action: s for s in small.suggestions}
    assert small.suggestions and all(s.saves_bytes > 0 for s in small.suggestions)
    # bfloat16 training weights halve params + AdamW moments (the train phase's persistent state).
    half = [s for a, s in actions.items() if a.startswith("--config.model.param_dtype=bfloat16")]
    m = result.measurement
    assert half and half[0].saves_bytes == (m.analytic.params + m.analytic.opt_state) // 2
    report = planner.format_report(small)
    assert "DOES NOT FIT" in report and "suggestions" in report and "XLA:CPU" in report


def test_suggestions_address_only_the_phase_over_budget(result):
    m = result.measurement
    train, rollout = m.train_peak_bytes, m.rollout_peak_bytes
    assert train != rollout
    verdict = planner.assess(m, custom_topology(8, (train + rollout) / 2 / GIB))
    assert verdict.verdict == "DOES NOT FIT"
    assert {s.phase for s in verdict.suggestions} == {"train" if train > rollout else "rollout"}


def test_micro_batch_suggestion_covers_the_overage_with_whole_rows(padded_result):
    import dataclasses
    m = padded_result.measurement
    per_row = 100 * 2 ** 20
    # Pretend 4 rows per device whose activations cost `per_row` each, on top of the gradient sum.
    m4 = dataclasses.replace(
        m, shapes=dataclasses.replace(m.shapes, micro_batch_size=32, num_micro=2),
        train=dataclasses.replace(m.train, temp_bytes=m.analytic.grad_accumulator + 4 * per_row))
    over = int(1.5 * per_row)  # needs two rows fewer: 4 -> 2 rows, micro-batch 32 -> 16
    verdict = planner.assess(m4, custom_topology(8, (m4.train_peak_bytes - over) / GIB))
    micro = [s for s in verdict.suggestions if "micro_batch_size" in s.action]
    assert len(micro) == 1 and micro[0].action.startswith("--config.trainer.micro_batch_size=16 ")
    assert micro[0].saves_bytes == 2 * per_row


def test_token_budget_suggestion_covers_the_overage_with_whole_rows(result):
    import dataclasses
    m = result.measurement
    per_row = 100 * 2 ** 20
    # Pretend a budget of 4 full-length rows per device whose activations cost `per_row` each.
    m4 = dataclasses.replace(
        m, shapes=dataclasses.replace(m.shapes, rows_per_device=4, token_budget=4 * SEQ),
        train=dataclasses.replace(m.train, temp_bytes=4 * per_row))
    over = int(1.5 * per_row)  # needs two rows fewer: 4 -> 2 rows, budget 4 * SEQ -> 2 * SEQ
    verdict = planner.assess(m4, custom_topology(8, (m4.train_peak_bytes - over) / GIB))
    budget = [s for s in verdict.suggestions if "max_tokens_per_micro_batch" in s.action]
    assert len(budget) == 1
    assert budget[0].action.startswith(f"--config.trainer.max_tokens_per_micro_batch={2 * SEQ} ")
    assert budget[0].saves_bytes == 2 * per_row


def test_activation_estimate_matches_closed_form():
    cfg = planner.model_config(_small_config())
    rows, seq = 3, 40
    # remat=full keeps only each layer's bfloat16 input [rows, seq, hidden].
    assert planner.activation_bytes(cfg, rows, seq, 1, "full") == 24 * rows * seq * 896 * 2
    none = planner.activation_bytes(cfg, rows, seq, 1, "none")
    # Without remat the [heads, T, T] scores (float32 + bfloat16 probabilities) are kept too.
    assert none >= 24 * rows * 14 * seq * seq * 6
    # Dense attention materialises one layer's [rows, heads/tensor, T, T] float32 scores; the default
    # ("auto": blockwise or a kernel) holds at most one [rows, heads, T, block] key block.
    assert planner.attention_score_bytes(cfg, rows, seq, 2, "dense") == rows * 7 * seq * seq * 4
    long = 4096
    assert (planner.attention_score_bytes(cfg.replace(attention="blockwise"), rows, long, 2)
            == rows * 7 * long * 512 * 4)
    assert planner.attention_score_bytes(cfg, rows, long, 2) < rows * 7 * long * long * 4 / 4


def test_micro_batch_not_divisible_by_batch_shards_names_the_field():
    c = _small_config()
    c.trainer.micro_batch_size = 4
    c.trainer.mini_batch_size = 8
    with pytest.raises(ValueError, match="trainer.micro_batch_size"):
        planner.measure(c, jax.devices()[:8])


def test_more_chips_than_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        planner.plan(_small_config(), "v5p-128", compiler="cpu")


@pytest.mark.parametrize("name,chips,hbm,hosts", [
    ("v5p-128", 64, 95 * GIB, 16), ("v4-8", 4, 32 * GIB, 1), ("v4-32", 16, 32 * GIB, 4),
    ("v5litepod-16", 16, 16 * GIB, 4), ("v5e-8", 8, 16 * GIB, 1), ("v6e-256", 256, 32 * GIB, 64),
    ("h100-80gb-x8", 8, 80 * GIB, 1), ("h200-x16", 16, 141 * GB, 2), ("a100-80gb-x4", 4, 80 * GIB, 1),
])
def test_topology_table(name, chips, hbm, hosts):
    t = parse_topology(name)
    assert (t.chips, t.hbm_bytes, t.hosts) == (chips, hbm, hosts)


@pytest.mark.parametrize("name", ["v5p-127", "tpu-8", "v7-8", "h100-x8"])
def test_unknown_topology_lists_known_forms(name):
    with pytest.raises(ValueError, match="Known forms: v4-N"):
        parse_topology(name)


def test_cli_creates_its_own_fake_devices(tmp_path):
    # The parent process has 8 fake devices; the CLI must re-create 2 for --devices 2.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("_DAPO_PLAN_REEXEC", None)
    args = [sys.executable, "-m", "dapo_jax.plan", "--config", "configs/toy.py", "--devices", "2",
            "--hbm_gib", "1", "--config.trainer.micro_batch_size=2",
            "--config.trainer.mini_batch_size=4", "--config.rollout.max_concurrent_decodes=4",
            "--config.rollout.steps_per_sync=1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 2x1GiB: 2 devices" in out.stdout
    assert "-> FITS" in out.stdout and "compile time: train gradient step" in out.stdout



def test_cli_falls_back_to_xla_cpu_for_the_breakdown_when_xla_tpu_refuses(tmp_path):
    # A named TPU slice with libtpu installed compiles with XLA:TPU ("auto"); a step too big for a
    # chip is refused by it, so the CLI says which and re-plans on fake CPU devices for the numbers.
    env = dict(os.environ, XLA_FLAGS="")
    env.pop("_DAPO_PLAN_REEXEC", None)
    args = [sys.executable, "-m", "dapo_jax.plan", "--config", "configs/toy.py", "--topology",
            "v5e-8", "--config.data.max_prompt_length=2048", "--config.data.max_response_length=2048",
            "--config.trainer.max_tokens_per_micro_batch=1048576"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("XLA:TPU: the train gradient step does not fit one chip of v5e-8 "
                                 "(16.0 GiB): RESOURCE_EXHAUSTED"), out.stdout[:500]
    assert "(lower + compile on XLA:CPU)" in out.stdout and "-> DOES NOT FIT" in out.stdout
    assert "suggestions (estimated per-device saving" in out.stdout
    # Progress on stderr: each compile as it starts and ends (a 32B step takes minutes).
    assert "plan: compiling the train gradient step with XLA:TPU for 8 devices..." in out.stderr
    assert "plan: compiling the decode step with XLA:CPU for 8 devices..." in out.stderr
    assert re.search(r"plan: compiled the decode step in \d+\.\d s", out.stderr)
