"""HF checkpoint <-> JAX: bit-exact round trips, sharded multi-file checkpoints, sharded loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from dapo_jax import models
from tests.conftest import make_hf_model


def _tensors(directory):
    """All tensors of a HF directory (safetensors' own reader, independent of ours)."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen2_mha_tied_odd_head", "llama_gqa_untied"])
def test_hf_to_jax_to_hf_round_trip_is_bit_exact(hf_checkpoints, tmp_path, name):
    src, hf_model = hf_checkpoints[name]
    model, cfg = models.load_pretrained(src)
    models.save_pretrained(model, cfg, tmp_path)
    before, after = _tensors(src), _tensors(tmp_path)
    assert set(before) == set(after)
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    # transformers loads the export and computes the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf_model(ids).logits.numpy())


def test_multi_file_sharded_checkpoint_loads_and_bf16_round_trips(tmp_path):
    hf_model = make_hf_model("qwen2_mqa_tied").to(torch.bfloat16)
    src = tmp_path / "src"
    hf_model.save_pretrained(src, max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, cfg = models.load_pretrained(src, dtype="bfloat16")
    assert model.params()["embed"].dtype == jnp.bfloat16
    out = tmp_path / "out"
    models.save_pretrained(model, cfg, out, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    before, after = _tensors(src), _tensors(out)
    assert set(before) == set(after)
    for k in before:
        np.testing.assert_array_equal(before[k].view(np.uint16), after[k].view(np.uint16), err_msg=k)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_loading_onto_a_mesh_puts_each_tensor_in_its_target_sharding(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    mesh = models.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model, cfg = models.load_pretrained(path, mesh=mesh)
    ref, _ = models.load_pretrained(path)
    params, ref_params = model.params(), ref.params()
    q = params["layers"]["q_kernel"]  # [L, D, H, hd] -> embed over fsdp, heads over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 8, 2, 8)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, ref_params)


def test_missing_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        models.load_pretrained(tmp_path)
