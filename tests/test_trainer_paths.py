"""Trainer paths the end-to-end tests leave open: the non-finite-gradient skip, the learning-rate
warmup really applied, and the Hugging Face export, each against an independent reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo_jax import models
from dapo_jax.runtime.host_transfer import tree_to_host
from dapo_jax.training.trainer import Trainer
from tests.state_checks import assert_bitwise_equal, bitwise_differences, host_state
from tests.test_trainer import small_config, text_hash_scores


def one_update_config(**overrides):
    """small_config from a random policy, with one optimizer update per step (2 groups x 4 samples
    = one mini-batch of 8) and no weight decay, so a step is exactly one AdamW update."""
    return small_config(**{"warm_start.steps": 0, "trainer.mini_batch_size": 8,
                           "trainer.micro_batch_size": 4, "optim.weight_decay": 0.0, **overrides})


def nan_scores(responses, truths):
    """text_hash_scores' correctness (so dynamic sampling keeps mixed groups) with NaN scores."""
    return [{**r, "score": float("nan")} for r in text_hash_scores(responses, truths)]


def test_update_with_a_nan_gradient_is_skipped_and_leaves_params_and_optimizer_state_unchanged(
        tmp_path):
    """NaN rewards give NaN advantages, loss and gradient: the update must be skipped, not applied
    (one NaN in AdamW's moments would poison every later step). Params and every optimizer-state
    leaf (moments, step count, learning rate) stay bit-identical, the skip is counted, and the
    next step with finite rewards updates normally."""
    tr = Trainer(one_update_config(), str(tmp_path), progress=False, reward_fn=nan_scores)
    before = host_state(tr)
    m = tr.train_step()
    assert m["actor/num_updates"] == 1 and m["actor/updates_skipped"] == 1
    assert np.isnan(m["actor/grad_norm"]) and np.isnan(m["critic/score/mean"])
    assert_bitwise_equal(before, host_state(tr))

    tr.reward_fn = text_hash_scores
    m = tr.train_step()
    tr.close()
    assert m["actor/updates_skipped"] == 0 and np.isfinite(m["actor/grad_norm"])
    after = host_state(tr)
    assert bitwise_differences(before["params"], after["params"])  # this update was applied
    assert int(after["opt_state"].inner_state[1][0].count) == 1  # AdamW's first step, not its second


def test_learning_rate_warms_up_linearly_and_is_the_one_applied(tmp_path):
    """DAPO's schedule: lr * min(1, step / warmup) at training steps 1, 2, ... (linear warmup from
    lr / warmup, then constant). Checked three ways: the logged actor/lr; the learning rate stored
    in the optimizer state by each update; and the size of AdamW's first update, which is
    lr_1 * |g| / (|g| + eps) = lr_1 for every coordinate whose gradient is far above eps."""
    lr, warmup = 1e-2, 3
    expected = [lr * min(1.0, step / warmup) for step in range(1, warmup + 2)]
    assert expected == pytest.approx([lr / 3, 2 * lr / 3, lr, lr])
    tr = Trainer(one_update_config(**{"optim.lr": lr, "optim.warmup_steps": warmup}),
                 str(tmp_path), progress=False, reward_fn=text_hash_scores)
    start = tree_to_host(tr.params)
    for step, want in enumerate(expected, start=1):
        m = tr.train_step()
        assert m["actor/updates_skipped"] == 0, step
        assert m["actor/lr"] == pytest.approx(want, rel=1e-6), step
        stored = tree_to_host(tr.opt_state).hyperparams["learning_rate"]
        assert float(stored) == pytest.approx(want, rel=1e-6), step  # float32 arithmetic
        if step == 1:
            moved = np.concatenate([np.abs(np.asarray(after, np.float64) - before).ravel()
                                    for before, after in zip(jax.tree.leaves(start),
                                                             jax.tree.leaves(tree_to_host(tr.params)))])
            moved = moved[moved > 0]  # (a coordinate with no gradient at all would not move)
            # The largest step is lr_1 (round-off of weights ~0.1 is ~1e-8), and it is the typical
            # one: gradients far above eps (seen: 99.6% of coordinates within 1% of lr_1).
            assert moved.max() == pytest.approx(expected[0], rel=1e-4)
            assert np.mean(np.abs(moved - expected[0]) <= 1e-2 * expected[0]) > 0.95
    tr.close()


def test_exported_checkpoint_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path):
    """`Trainer.export_hf` after a training step: transformers' Qwen2ForCausalLM loads the directory
    and computes the logits of our forward pass (the independent reference implementation), and
    the tokenizer saved beside it encodes text as the trainer's does."""
    tr = Trainer(one_update_config(), str(tmp_path / "run"), progress=False,
                 reward_fn=text_hash_scores)
    tr.train_step()  # weights that moved away from their initialisation
    out = tmp_path / "export"
    tr.export_hf(out)
    tr.close()

    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    text = "12 + 7 = 19. Answer: 19"
    encoded = tr.tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    ids = np.stack([np.resize(encoded, 16), rng.integers(0, len(tr.tokenizer), 16),
                    rng.integers(0, len(tr.tokenizer), 16)]).astype(np.int32)
    ours = models.forward(models.model_from_params(tr.model_cfg, tr.params), jnp.asarray(ids))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert theirs.shape == (3, 16, tr.model_cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)

    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    exported_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert exported_tokenizer(text, add_special_tokens=False)["input_ids"] == encoded
    assert exported_tokenizer.eos_token_id == tr.tokenizer.eos_token_id
    assert len(exported_tokenizer) == len(tr.tokenizer)
