"""Model size presets match the official Qwen2.5 configs; bad configs fail with clear messages."""

import pytest

from dapo_jax.models import config as config_lib


@pytest.mark.parametrize("name,billions", [
    ("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.544), ("qwen2.5-3b", 3.086), ("qwen2.5-7b", 7.616),
    ("qwen2.5-14b", 14.770), ("qwen2.5-32b", 32.764), ("qwen2.5-72b", 72.706),
    ("qwen2.5-math-1.5b", 1.544), ("qwen2.5-math-7b", 7.616)])
def test_presets_have_the_published_parameter_counts(name, billions):
    cfg = config_lib.preset(name)
    assert abs(cfg.num_params / 1e9 - billions) < 0.01


def test_hf_config_round_trip_and_validation():
    cfg = config_lib.preset("qwen2.5-7b")
    assert config_lib.from_hf_config(config_lib.to_hf_config(cfg)) == cfg
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cfg.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat must be one of"):
        cfg.replace(remat="sometimes")
    with pytest.raises(ValueError, match="Unknown model preset 'qwen3'"):
        config_lib.preset("qwen3")
