"""runtime.cross_lowering: on this CPU, the trainer's and the sampler's programs lower for TPU and GPU,
sharded over an abstract multi-chip mesh, with the Pallas kernels the model picks on that hardware
(splash attention and the ragged paged decode kernel on TPU, Pallas flash attention on GPU) and no
[T, T] attention scores anywhere in the training program."""

import re

import jax
import jax.numpy as jnp
import pytest

from configs.base import get_base_config
from dapo_jax import experiment
from dapo_jax import plan as planner
from dapo_jax.models import attention, hf_checkpoint
from dapo_jax.runtime import cross_lowering
from dapo_jax.runtime.mesh_config import mesh_sizes
from dapo_jax.runtime.topology import parse_topology
from dapo_jax.training.update import build_packed_logprob_fn

SPLASH = {"splash_mqa_fwd_segmented_residuals", "splash_mqa_dkv_segmented_no_residuals"}
TRITON = {"mha_forward", "mha_preprocess_backward", "mha_backward"}
PROMPT, RESPONSE = 128, 256  # rows of 384 tokens: no model dimension is a multiple of 384


def _config(preset: str, *, packing: bool = True, attention_impl: str = "auto"):
    c = get_base_config()
    c.model.preset = preset
    c.model.vocab_size = 4096  # any: lowering allocates nothing
    c.model.dtype = "bfloat16"
    c.model.attention = attention_impl
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2  # heads split over tensor: shard_map'd kernels
    c.data.max_prompt_length = PROMPT
    c.data.max_response_length = RESPONSE
    c.trainer.packing = packing
    c.trainer.mini_batch_size = 8
    c.trainer.micro_batch_size = 4
    c.rollout.max_concurrent_decodes = 8
    c.rollout.steps_per_sync = 2
    return c


def _setup(config, topology: str):
    topo = parse_topology(topology)
    cfg = planner.model_config(config)
    mesh = cross_lowering.abstract_mesh(mesh_sizes(config.mesh, topo.chips), topo.device_kind,
                                        topo.kind, topo.cores_per_chip)
    shapes = planner.planned_shapes(config, cfg, mesh)
    return topo, cfg, mesh, shapes


def _lowered_text(trace, mesh) -> str:
    platform = cross_lowering.lowering_platform(mesh.abstract_device.platform)
    with cross_lowering.tracing_for(mesh):
        return trace().lower(lowering_platforms=(platform,)).as_text()


def _score_tensors(text: str, t: int) -> set[str]:
    """float32 tensors [..., n x t, t]: scores of t (or, query heads folded in, n x t) queries
    over t keys."""
    found = re.findall(rf"tensor<((?:\d+x)*(\d+)x{t}xf32)>", text)
    return {shape for shape, queries in found if int(queries) % t == 0}


@pytest.mark.parametrize("preset,topology", [
    ("qwen2.5-0.5b", "v5p-8"), ("qwen2.5-1.5b", "v5p-8"),
    ("qwen2.5-0.5b", "h100-80gb-x4"), ("qwen2.5-1.5b", "h100-80gb-x4"),
])
def test_train_and_decode_steps_lower_with_the_platforms_kernels(preset, topology):
    config = _config(preset)
    topo, cfg, mesh, shapes = _setup(config, topology)
    tx, _ = experiment.optimizer(config)
    train, decode = planner.lower_for_topology(config, cfg, shapes, tx, topo)
    assert train.ok, train.error
    assert decode.ok, decode.error
    assert mesh.shape == {"data": 1, "fsdp": 2, "tensor": 2}
    if topo.kind == "tpu":
        assert (train.platform, set(train.kernels)) == ("tpu", SPLASH)
        # The ragged paged attention kernel needs head_dim % 128 == 0 (1.5B: 128; 0.5B: 64, which
        # keeps the XLA page loop).
        expected = ("ragged_paged_attention_kernel",) if cfg.head_dim % 128 == 0 else ()
        assert decode.kernels == expected
    else:
        assert (train.platform, set(train.kernels)) == ("cuda", TRITON)
        assert decode.kernels == ()  # the XLA page loop on GPU


@pytest.mark.parametrize("topology,kernels", [("v5p-8", SPLASH), ("h100-80gb-x4", TRITON)])
def test_padded_update_step_lowers_with_the_platforms_kernels(topology, kernels):
    config = _config("qwen2.5-0.5b", packing=False)
    topo, cfg, mesh, shapes = _setup(config, topology)
    tx, _ = experiment.optimizer(config)
    train, _ = planner.lower_for_topology(config, cfg, shapes, tx, topo)
    assert train.ok and train.name == "train update step" and set(train.kernels) == kernels


@pytest.mark.parametrize("topology,kernel", [
    ("v5p-8", "splash_mqa_fwd_segmented_no_residuals"), ("h100-80gb-x4", "mha_forward")])
def test_old_logprob_pass_lowers_forward_only_kernels(topology, kernel):
    config = _config("qwen2.5-0.5b")
    topo, cfg, mesh, shapes = _setup(config, topology)
    loss = experiment.loss_settings(config, mesh)
    shardings = hf_checkpoint.param_shardings(cfg, mesh)
    micro = planner._abstract_micro(mesh, shapes)
    micro = {k: micro[k] for k in ("input_ids", "segment_ids", "positions", "response_mask")}
    micro["rollout_logprobs"] = jax.ShapeDtypeStruct(micro["input_ids"].shape, jnp.float32,
                                                     sharding=micro["input_ids"].sharding)
    fn = build_packed_logprob_fn(cfg, mesh, shardings, loss)
    program = cross_lowering.lower(
        "old log-probs", lambda: fn.trace(planner.abstract_params(cfg, shardings), micro), mesh)
    assert program.ok and program.kernels == (kernel,)


@pytest.mark.parametrize("topology", ["v5p-8", "h100-80gb-x4"])
def test_training_program_holds_no_attention_score_matrix(topology):
    config = _config("qwen2.5-0.5b")
    topo, cfg, mesh, shapes = _setup(config, topology)
    tx, _ = experiment.optimizer(config)
    row = shapes.row_length
    assert row == PROMPT + RESPONSE
    text = _lowered_text(lambda: planner.trace_train_step(config, cfg, mesh, shapes, tx), mesh)
    assert not _score_tensors(text, row)
    # The check can fail: the dense reference puts float32 scores [rows, KV heads, G x 384, 384] back.
    dense = _config("qwen2.5-0.5b", attention_impl="dense")
    _, dcfg, dmesh, dshapes = _setup(dense, topology)
    text = _lowered_text(lambda: planner.trace_train_step(dense, dcfg, dmesh, dshapes, tx), dmesh)
    assert _score_tensors(text, row)


def test_tracing_for_switches_the_target_platform_and_restores_the_kernel_lookup():
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as tb
    saved = tb.get_tpu_version, tb.get_device_name
    assert attention.target_platform() == "cpu"
    assert attention.resolve_attention("auto") == "blockwise"
    tpu = cross_lowering.abstract_mesh({"data": 1, "fsdp": 2, "tensor": 1}, "TPU v5", "tpu", 2)
    with cross_lowering.tracing_for(tpu):
        assert attention.target_platform() == "tpu"
        assert attention.resolve_attention("auto") == "splash"
        assert attention.resolve_paged_decode("auto", 128) == "ragged_tpu"
        assert attention.resolve_paged_decode("auto", 64) == "xla"
        assert tb.get_tpu_version() == 5 and tb.get_device_name() == "TPU v5"
    gpu = cross_lowering.abstract_mesh({"data": 1, "fsdp": 2, "tensor": 1}, "NVIDIA H200", "gpu")
    with cross_lowering.tracing_for(gpu):
        assert attention.resolve_attention("auto") == "pallas_gpu"
        assert attention.resolve_paged_decode("auto", 128) == "xla"
    assert (tb.get_tpu_version, tb.get_device_name) == saved
    assert attention.target_platform() == "cpu"


def test_a_program_that_fails_to_lower_is_reported_not_raised():
    tpu = cross_lowering.abstract_mesh({"data": 1, "fsdp": 1, "tensor": 1}, "TPU v5", "tpu", 2)

    def trace():
        raise ValueError("block size 96 does not divide 128\nmore detail")

    program = cross_lowering.lower("decode step", trace, tpu)
    assert not program.ok
    assert program.error == "ValueError: block size 96 does not divide 128"
    with pytest.raises(ValueError, match="abstract_device"):
        with cross_lowering.tracing_for(jax.sharding.AbstractMesh((1,), ("data",))):
            pass
