"""model.path resolution: Hub ids through the Hugging Face cache (offline), with a clear error when the
id is neither local nor cached; a folder holding one .gguf file is that file."""

import shutil

import numpy as np
import pytest
import torch

from dapo_jax import models
from dapo_jax.models import sources
from dapo_jax.models.hf_checkpoint import read_hf_config


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_uncached_hub_id_offline_error_names_id_cache_and_offline_switch(offline_cache):
    with pytest.raises(FileNotFoundError) as err:
        models.load_pretrained("someorg/not-a-cached-model")
    text = str(err.value)
    assert "someorg/not-a-cached-model" in text and str(offline_cache) in text
    assert "HF_HUB_OFFLINE" in text


def test_cached_hub_id_loads_like_its_directory(offline_cache, hf_checkpoints):
    path, hf_model = hf_checkpoints["qwen2_gqa_untied"]
    commit = "0" * 40
    repo = offline_cache / "models--someorg--tiny-qwen2"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert sources.resolve("someorg/tiny-qwen2").local == str(repo / "snapshots" / commit)
    assert read_hf_config("someorg/tiny-qwen2")["hidden_size"] == hf_model.config.hidden_size
    model, _ = models.load_pretrained("someorg/tiny-qwen2")
    ids = np.array([[5, 9, 3, 17, 2]])
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(models.forward(model, ids)), ref, atol=1e-4)


def test_missing_local_path_names_the_accepted_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*gguf.*Hub id"):
        sources.resolve(str(tmp_path / "nope"))


def test_folder_with_one_gguf_file_resolves_to_it(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    source = sources.resolve(tmp_path)
    assert source.is_gguf and source.local.endswith("model.gguf")
