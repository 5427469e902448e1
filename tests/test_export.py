"""`python -m dapo_jax.export`: a training workdir (or any model.path) becomes a HF directory that
transformers loads, computes our logits with, and generates from, stopping at the run's stop tokens."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dapo_jax import export, models
from dapo_jax.models.sharding import make_mesh
from dapo_jax.training import checkpointing
from dapo_jax.training.trainer import Trainer
from tests.test_trainer import small_config


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
    """A two-step toy run (checkpoints at steps 1 and 2, run record with its toy tokenizer)."""
    workdir = tmp_path_factory.mktemp("toy_run")
    c = small_config(**{"warm_start.steps": 0, "algo.dynamic_sampling.enable": False,
                        "trainer.gen_batch_size": 2})
    tr = Trainer(c, str(workdir), progress=False)
    tr.train()
    tr.close()
    return workdir


def _our_logits(workdir, step, ids: np.ndarray) -> np.ndarray:
    one_device = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    params, cfg, _ = checkpointing.restore_workdir_params(workdir, step, one_device)
    model = models.model_from_params(cfg, params)
    return np.asarray(models.forward(model, jax.numpy.asarray(ids)))


def test_exported_workdir_loads_in_transformers_with_our_logits_and_stop_tokens(toy_workdir,
                                                                                tmp_path):
    out = tmp_path / "hf"
    result = export.main(["export", "--workdir", str(toy_workdir), "--out", str(out)])
    assert result["step"] == 2  # the latest checkpoint
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                                "tokenizer.json", "generation_config.json"}
    tok = AutoTokenizer.from_pretrained(out)
    # Every stop token the run sampled with (the toy tokenizer knows both defaults) and its EOS.
    stops = json.loads((toy_workdir / "run" / "config.json").read_text())["tokenizer"]["stop_tokens"]
    expected = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in stops
                                     if t in tok.get_vocab()}
    assert len(expected) >= 2
    gen = GenerationConfig.from_pretrained(out)
    assert set(gen.eos_token_id) == expected

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.asarray(tok("1 + 2 + 3 =")["input_ids"], np.int64)[None]
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, _our_logits(toy_workdir, 2, ids), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        generated = hf.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    new = generated[0, ids.shape[1]:].tolist()
    # Generation stops at the first stop token (or runs to max_new_tokens without one).
    assert all(t not in expected for t in new[:-1])


def test_export_of_an_earlier_step_writes_that_steps_parameters(toy_workdir, tmp_path):
    out = tmp_path / "hf1"
    assert export.main(["export", "--workdir", str(toy_workdir), "--step", "1", "--out",
                        str(out)])["step"] == 1
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.asarray([[4, 5, 6, 7]], np.int64)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, _our_logits(toy_workdir, 1, ids), rtol=1e-4, atol=1e-4)


def test_export_model_rewrites_a_hf_directory_bit_exactly(hf_checkpoints, toy_workdir, tmp_path):
    src_dir, hf_model = hf_checkpoints["qwen2_gqa_untied"]
    src = tmp_path / "src"
    shutil.copytree(src_dir, src)
    for f in (toy_workdir / "run" / "tokenizer").iterdir():  # a checkpoint ships its tokenizer
        shutil.copy(f, src / f.name)
    out = tmp_path / "out"
    export.main(["export", "--model", str(src), "--out", str(out)])
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert (out / "tokenizer.json").exists()
    # The source's own generation_config.json is kept.
    assert GenerationConfig.from_pretrained(out).eos_token_id == hf_model.generation_config.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        np.testing.assert_array_equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits.numpy(),
                                      hf_model(ids).logits.numpy())
