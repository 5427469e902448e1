"""Sharded (8 fake devices, fsdp x tensor) forward and gradients equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import models
from dapo_jax.models.sharding import batch_sharding, logical_to_spec, make_mesh


def _loss_fn(cfg, mesh):
    def loss(params, ids, mask):
        lp, _ = models.sequence_logprobs(params, cfg, ids, mask, mesh=mesh, chunk_size=4)
        return -jnp.sum(lp) / jnp.sum(mask)
    return loss


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_forward_and_grads_equal_single_device(hf_checkpoints, mesh_shape):
    assert jax.device_count() == 8
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(3, 128, size=(8, 12)))
    mask = jnp.asarray((np.arange(12)[None] >= rng.randint(0, 4, size=(8, 1))).astype(np.int32))

    single, cfg = models.load_pretrained(path)
    val1, g1 = jax.jit(jax.value_and_grad(_loss_fn(cfg, None)))(single.params(), ids, mask)
    logits1 = models.forward(single, ids, mask)

    mesh = make_mesh(mesh_shape)
    sharded, _ = models.load_pretrained(path, mesh=mesh)
    p_sh = models.param_shardings(cfg, mesh)
    b_sh = batch_sharding(mesh, 2)
    step = jax.jit(jax.value_and_grad(_loss_fn(cfg, mesh)), in_shardings=(p_sh, b_sh, b_sh),
                   out_shardings=(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                  p_sh))
    ids_s, mask_s = jax.device_put(ids, b_sh), jax.device_put(mask, b_sh)
    val8, g8 = step(sharded.params(), ids_s, mask_s)
    assert g8["layers"]["gate_kernel"].sharding.spec == logical_to_spec(
        ("layers", "embed", "mlp"), g8["layers"]["gate_kernel"].shape, mesh)
    np.testing.assert_allclose(float(val8), float(val1), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                         rtol=1e-4), g8, g1)
    logits8 = models.forward(sharded, ids_s, mask_s)
    np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=1e-5)


def test_mesh_arithmetic_and_rules():
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        make_mesh({"model": 8})
    # 2 KV heads on a tensor axis of 4 cannot split: replicated instead of failing inside XLA.
    mesh4 = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    spec = logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh4)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
