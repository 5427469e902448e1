"""The experiment builder is the one source of the run's pieces: the planner compiles exactly the
trainer's update step, evaluation decodes with the trainer's stop tokens, and the architecture
follows one documented precedence rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import toy
from dapo_jax import experiment, models, plan
from dapo_jax.config_validation import ConfigError
from dapo_jax.training.trainer import Trainer
from tests.test_trainer import apply_overrides


def _toy(**overrides):
    c = toy.get_config()
    c.warm_start.steps = 0  # the programs do not depend on the weights' values
    c.data.toy.num_train = 64
    c.data.toy.num_heldout = 8
    return apply_overrides(c, overrides)


@pytest.mark.parametrize("packing", [True, False])
def test_planner_lowers_exactly_the_trainers_update_step(tmp_path, packing):
    c = _toy(**{"trainer.packing": packing})
    tr = Trainer(c, str(tmp_path), progress=False)
    assert tr.packing == packing
    devices = jax.devices()[:c.mesh.num_devices]
    cfg = plan.model_config(c)
    assert cfg == tr.model_cfg  # same architecture, vocabulary sized from the same tokenizer
    mesh = models.make_mesh({a: int(c.mesh[a]) for a in ("data", "fsdp", "tensor")},
                            devices=devices)
    shapes = plan.planned_shapes(c, cfg, mesh)
    assert shapes.packing == packing
    planned = plan.lower_train_step(c, cfg, mesh, shapes, experiment.optimizer(c)[0]).as_text()
    rep = NamedSharding(tr.mesh, PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    if packing:
        # The trainer's gradient step for one micro-batch of the longest row bucket.
        assert (shapes.row_length, shapes.rows_per_device) == tr.layout.buckets[-1]
        grads, sums = tr.zero_fn(tr.params)
        micro = plan._abstract_micro(tr.mesh, shapes)
        trained = tr.grad_fn.lower(tr.params, grads, sums, micro, scalar, scalar).as_text()
    else:
        # The trainer's own jitted update, lowered for one mini-batch of the same shapes.
        minibatch = plan._abstract_minibatch(tr.mesh, shapes)
        trained = tr.update_fn.lower(tr.params, tr.opt_state, minibatch, scalar).as_text()
    tr.close()
    assert planned == trained


def test_architecture_is_the_preset_else_the_checkpoint(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2_gqa_untied"]
    c = _toy(**{"model.path": str(path), "model.preset": ""})
    from_checkpoint = experiment.resolve_model_config(c)
    assert (from_checkpoint.hidden_size, from_checkpoint.vocab_size) == (32, 128)
    c.model.preset = "tiny"  # a preset wins, and the loader checks the checkpoint against it
    assert experiment.resolve_model_config(c).hidden_size == models.preset("tiny").hidden_size
    with pytest.raises(ValueError, match="not the configured model.preset.*hidden_size"):
        experiment.check_architecture(experiment.resolve_model_config(c), from_checkpoint,
                                      str(path))
    c.model.path, c.model.preset = "", ""
    with pytest.raises(ConfigError, match="model.path and model.preset are both empty"):
        experiment.build(c, tokenizer_dir=str(path))


def test_random_preset_vocabulary_follows_the_tokenizer():
    c = _toy()
    assert experiment.resolve_model_config(c, tokenizer_size=300).vocab_size == 320
    c.model.vocab_size = 512
    assert experiment.resolve_model_config(c, tokenizer_size=300).vocab_size == 512
    with pytest.raises(ValueError, match="tokenizer has 600 tokens"):
        experiment.resolve_model_config(c, tokenizer_size=600)


def test_stop_ids_are_eos_then_every_known_stop_token(qwen_tokenizer_dir):
    tok = models.load_tokenizer(qwen_tokenizer_dir)
    stop, pad = experiment.stop_and_pad_ids(tok, ["<|im_end|>", "<|endoftext|>", "<|not_a_token|>"])
    vocab = tok.get_vocab()
    assert stop[0] == tok.eos_token_id
    assert set(stop) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert len(stop) == len(set(stop))
    assert pad == (tok.pad_token_id if tok.pad_token_id is not None else stop[0])


def test_loss_settings_carry_the_rollout_temperature_and_data_parallel_ranks():
    c = _toy(**{"rollout.temperature": 0.7, "algo.loss_agg_mode": "verl-legacy-token-mean",
                "trainer.micro_batch_size": 8, "trainer.mini_batch_size": 16})
    mesh = models.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
    s = experiment.loss_settings(c, mesh)
    assert s.temperature == 0.7 and s.num_dp_ranks == 4
    assert s.loss_scale_length == c.data.max_response_length
    assert np.isclose(s.clip_ratio_high, 0.28) and s.clip_ratio_c == 10.0
