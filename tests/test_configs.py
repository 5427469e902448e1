"""Experiment configs: every file loads and validates, overrides propagate, bad input fails clearly."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from dapo_jax.config_validation import ConfigError, validate_config
from dapo_jax.models.sharding import make_mesh
from dapo_jax.runtime.topology import parse_topology

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
TRAINING_CONFIGS = ["toy.py", "dapo_qwen2_5_32b.py", "dapo_qwen2_5_7b.py", "eval_aime.py"]


def parse(*args):
    """Parses `--config FILE --config.x=y ...` exactly as `python -m dapo_jax.train` does."""
    fv = flags.FlagValues()
    argv = ["prog", *args]
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_config_file_loads_and_validates(name):
    c = parse("--config", str(CONFIG_DIR / name))
    # An evaluation config takes its model from the checkpoint it evaluates.
    validate_config(c, training=not name.startswith("eval_"))


@pytest.mark.parametrize("stage", base.ABLATION_STAGES)
def test_ablation_ladder_stages_follow_table_1(stage):
    c = parse("--config", f"{CONFIG_DIR / 'dapo_qwen2_5_32b.py'}:{stage}")
    level = base.ABLATION_STAGES.index(stage)
    assert c.algo.overlong_filter == (level >= 1)
    assert c.algo.clip_ratio_high == (0.28 if level >= 2 else 0.2)
    assert c.algo.overlong_buffer.enable == (level >= 3)
    assert c.algo.loss_agg_mode == ("token-mean" if level >= 4 else "seq-mean-token-mean")
    assert c.algo.dynamic_sampling.enable == (level >= 5)
    validate_config(c) if level >= 5 else None


def test_cli_overrides_propagate_to_derived_fields():
    c = parse("--config", str(CONFIG_DIR / "toy.py"), "--config.data.max_response_length=64",
              "--config.trainer.total_steps=7")
    assert c.trainer.total_steps == 7
    assert c.rollout.max_new_tokens == 64 and c.eval.max_new_tokens == 64


def test_unknown_keys_and_wrong_types_fail_naming_the_key():
    with pytest.raises((AttributeError, KeyError, flags.Error), match="totl_steps.*total_steps"):
        parse("--config", str(CONFIG_DIR / "toy.py"), "--config.trainer.totl_steps=3")
    with pytest.raises(flags.IllegalFlagValueError, match="total_steps"):
        parse("--config", str(CONFIG_DIR / "toy.py"), "--config.trainer.total_steps=many")


def test_validation_lists_every_bad_field_with_the_fix():
    c = parse("--config", str(CONFIG_DIR / "toy.py"))
    c.unlock()
    c.trainer.mini_batch_size = 100
    c.algo.loss_agg_mode = "sequence-mean"
    c.rollout.top_p = 0.0
    c.warm_start.format_noise = 1.5
    c.rollout.decode_layout = "fast"
    c.rollout.out_major_weights = "on"  # a switch decode_layout replaced, set by an old config file
    with pytest.raises(ConfigError) as err:
        validate_config(c)
    msg = str(err.value)
    assert "config.warm_start.format_noise: must be in [0, 1]" in msg
    assert "config.trainer.mini_batch_size: must divide train_batch_size * rollout.n = 128" in msg
    assert "config.algo.loss_agg_mode" in msg and "token-mean" in msg
    assert "config.rollout.top_p" in msg
    assert ("config.rollout.decode_layout: must be one of ['auto', 'per_layer_out_major', "
            "'per_layer', 'stacked_out_major', 'stacked']") in msg
    assert "config.rollout.out_major_weights: was replaced by rollout.decode_layout" in msg


def test_paper_config_numbers_and_mesh_arithmetic_on_v5p_128():
    c = parse("--config", str(CONFIG_DIR / "dapo_qwen2_5_32b.py"))
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, 0.1, 1.0)
    assert (c.trainer.train_batch_size, c.rollout.n, c.trainer.mini_batch_size) == (512, 16, 512)
    assert c.trainer.train_batch_size * c.rollout.n // c.trainer.mini_batch_size == 16  # updates
    assert (c.algo.clip_ratio_low, c.algo.clip_ratio_high) == (0.2, 0.28)
    assert (c.data.max_prompt_length, c.data.max_response_length) == (2048, 20480)
    assert c.algo.overlong_buffer.len == 4096 and c.trainer.gen_batch_size == 1536
    assert (c.eval.n, c.eval.top_p, c.rollout.temperature) == (32, 0.7, 1.0)
    chips = parse_topology("v5p-128").chips
    validate_config(c, num_devices=chips)
    # The mesh for 64 chips: tensor 8 x fsdp 8 (fake devices are not needed to check the arithmetic).
    import numpy as np
    mesh = make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor},
                     devices=list(np.arange(chips)))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 8}
    assert c.trainer.micro_batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    with pytest.raises(ConfigError, match="micro_batch_size: must be a multiple"):
        c.unlock()
        c.trainer.micro_batch_size = 4
        validate_config(c, num_devices=chips)


def test_list_fields_take_comma_separated_values_on_the_command_line():
    from dapo_jax.config_validation import as_list

    c = parse("--config", str(CONFIG_DIR / "toy.py"), "--config.data.val=aime2024,math500",
              "--config.tokenizer.stop_tokens=<|im_end|>")
    validate_config(c)
    assert c.data.val == ("aime2024", "math500")
    assert c.tokenizer.stop_tokens == ("<|im_end|>",)
    c = parse("--config", str(CONFIG_DIR / "toy.py"), "--config.data.val=('toy', 'aime2024')")
    validate_config(c)
    assert c.data.val == ("toy", "aime2024")
    assert as_list("a, b,,c") == ["a", "b", "c"] and as_list(["a,b", "c"]) == ["a", "b", "c"]
    assert as_list(()) == [] and as_list(None) == []


def test_lr_schedule_and_truncation_are_validated():
    c = parse("--config", str(CONFIG_DIR / "toy.py"), "--config.optim.lr_schedule=exponential",
              "--config.optim.min_lr_ratio=1.5", "--config.data.truncation=middle",
              "--config.logging.wandb_project=dapo")
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    msg = str(e.value)
    assert "config.optim.lr_schedule: must be one of ('constant', 'cosine', 'linear')" in msg
    assert "config.optim.min_lr_ratio: must be in [0, 1]" in msg
    assert "config.data.truncation: must be one of ('left', 'right', 'error')" in msg
    assert "wandb" not in msg
    c = parse("--config", str(CONFIG_DIR / "toy.py"), "--config.optim.lr_schedule=cosine",
              "--config.optim.warmup_steps=30", "--config.trainer.total_steps=30")
    with pytest.raises(ConfigError, match=r"optim.warmup_steps: must be < trainer.total_steps"):
        validate_config(c)


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_lr_schedule_warms_up_then_decays_to_min_lr_at_the_last_step(decay):
    """Against the closed forms: warmup lr*(s+1)/W, then cosine / linear from lr to lr*r over the
    steps W-1 .. T-1."""
    import math

    from dapo_jax.experiment import optimizer

    c = parse("--config", str(CONFIG_DIR / "toy.py"), f"--config.optim.lr_schedule={decay}",
              "--config.optim.lr=0.5", "--config.optim.warmup_steps=4",
              "--config.optim.min_lr_ratio=0.1", "--config.trainer.total_steps=14")
    validate_config(c)
    _, schedule = optimizer(c)
    lr, W, T, r = 0.5, 4, 14, 0.1
    for s in range(T + 2):
        if s < W:
            want = lr * (s + 1) / W
        elif decay == "constant":
            want = lr
        else:
            t = min((s - (W - 1)) / (T - W), 1.0)
            shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
            want = lr * (r + (1 - r) * shape)
        assert float(schedule(s)) == pytest.approx(want, rel=1e-5), (s, want)
