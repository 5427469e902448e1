"""End-to-end DAPO training on the toy config: steps run, resume is exact, dynamic sampling fills."""


import numpy as np
import pytest

from configs import toy
from dapo_jax import algo
from dapo_jax.training.metrics_writer import read_metrics
from dapo_jax.training.trainer import Trainer
from tests.state_checks import assert_bitwise_equal, assert_metrics_equal, host_state


def small_config(**overrides):
    """The toy config shrunk to test size (a handful of SFT steps, tiny batches, no validation)."""
    c = toy.get_config()
    c.model.preset = "tiny"
    c.data.toy.num_train = 64
    c.data.toy.num_heldout = 8
    c.data.toy.max_digits = 1
    c.warm_start.steps = 3
    c.warm_start.batch_size = 8
    c.rollout.n = 4
    c.rollout.max_concurrent_decodes = 16
    c.data.max_response_length = 12
    c.algo.overlong_buffer.len = 4
    c.trainer.train_batch_size = 2
    c.trainer.gen_batch_size = 3
    c.trainer.mini_batch_size = 4
    c.trainer.micro_batch_size = 2
    c.trainer.total_steps = 2
    c.trainer.save_every = 1
    c.trainer.test_freq = 0
    c.trainer.val_before_train = False
    c.algo.dynamic_sampling.max_num_gen_batches = 3
    c.algo.dynamic_sampling.on_cap = "proceed"
    # The barely trained policy rarely stops inside 12 tokens: don't filter every sample away.
    c.algo.overlong_filter = False
    return apply_overrides(c, overrides)


def apply_overrides(c, overrides):
    """Sets dotted config keys ({"trainer.total_steps": 3}) on `c`; returns it."""
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def text_hash_scores(responses, truths):
    """A deterministic stand-in reward that gives mixed groups even for an untrained policy."""
    out = []
    for i, text in enumerate(responses):
        # every third group of 4 is all-wrong (dynamic sampling must drop it); the rest vary by text
        acc = (i // 4) % 3 != 0 and sum(text.encode()) % 3 == 0
        out.append({"score": 1.0 if acc else -1.0, "acc": acc, "pred": text[-5:]})
    return out


def test_two_training_steps_run_end_to_end_and_log_verl_metrics(tmp_path):
    # The real math_dapo reward on a barely trained policy: all groups are all-wrong, so train on
    # every group (no dynamic sampling; zero advantages still run the whole update path).
    c = small_config(**{"trainer.test_freq": 2, "trainer.val_before_train": True, "eval.n": 2,
                        "eval.max_problems": 4, "algo.dynamic_sampling.enable": False,
                        "trainer.gen_batch_size": 2})
    tr = Trainer(c, str(tmp_path), progress=False)
    history = tr.train()
    tr.close()
    assert len(history) == 2 and tr.step == 2
    for key in ("critic/score/mean", "train/acc_before_filter", "response_length/mean",
                "response_length/max", "response_length/clip_ratio", "actor/entropy",
                "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/pg_loss",
                "actor/grad_norm", "actor/lr", "train/num_gen_batches", "timing_s/gen",
                "timing_s/reward", "timing_s/old_log_prob", "timing_s/update_actor", "timing_s/step",
                "perf/train_tokens_per_s"):
        assert key in history[-1], key
        assert np.isfinite(history[-1][key]), key
    assert history[-1]["actor/entropy"] > 0
    for m in history:
        # No dynamic sampling: one generation batch of 2 prompts x 4 samples is the whole batch,
        # and mini-batches of 4 samples make it two optimizer updates.
        assert m["train/num_gen_batches"] == 1 and m["train/num_samples"] == 8
        assert m["actor/num_updates"] == 2
        assert 1 <= m["response_length/min"] <= m["response_length/max"] <= 12
    logged = read_metrics(tmp_path)
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert any(k.startswith("val-core/toy/acc/mean@2") for k in logged[0])  # validation logged
    assert any(k.startswith("val-core/toy/acc/mean@2") for k in logged[2])
    assert (tmp_path / "eval" / "step_000002" / "toy" / "report.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert list((tmp_path / "tensorboard").iterdir())


def test_stopped_and_resumed_run_matches_the_uninterrupted_run(tmp_path):
    """A run stopped after step 2 and resumed from its checkpoint ends bit-identical to one run of
    3 steps: every parameter and optimizer-state leaf (AdamW moments, count, injected lr), and
    step 3's metrics exactly (timings aside)."""
    full = Trainer(small_config(**{"trainer.total_steps": 3}), str(tmp_path / "full"),
                   progress=False, reward_fn=text_hash_scores)
    reference = full.train()
    reference_state = host_state(full)
    full.close()

    first = Trainer(small_config(**{"trainer.total_steps": 2}), str(tmp_path / "resume"),
                    progress=False, reward_fn=text_hash_scores)
    first.train()
    first.close()
    resumed = Trainer(small_config(**{"trainer.total_steps": 3}), str(tmp_path / "resume"),
                      progress=False, reward_fn=text_hash_scores)
    assert resumed.step == 2
    tail = resumed.train()
    resumed_state = host_state(resumed)
    resumed.close()
    assert len(tail) == 1
    # dynamic sampling really ran (groups dropped, state carried through the checkpoint)
    assert reference[2]["actor/grad_norm"] > 0
    assert sum(m["dynamic_sampling/dropped_groups"] for m in reference) > 0
    assert_bitwise_equal(reference_state, resumed_state)
    assert_metrics_equal(reference[2], tail[0])


def test_dynamic_sampling_fills_the_batch_when_some_groups_have_equal_rewards(tmp_path):
    """Rewards forced all-correct for half the prompts: those groups are dropped, more batches drawn."""
    calls = {"n": 0}

    def fake_scores(responses, truths):
        out = []
        for i, _ in enumerate(responses):
            group = i // 4
            calls["n"] += 1
            if group % 2 == 0:
                acc = True  # all-correct group: no signal, must be filtered
            else:
                acc = (i % 4) < 2  # mixed group: kept
            out.append({"score": 1.0 if acc else -1.0, "acc": acc, "pred": "x"})
        return out

    c = small_config(**{"trainer.total_steps": 1, "trainer.train_batch_size": 3,
                        "trainer.gen_batch_size": 2, "trainer.mini_batch_size": 12,
                        "trainer.micro_batch_size": 4, "algo.overlong_buffer.enable": False,
                        "algo.dynamic_sampling.max_num_gen_batches": 0})
    tr = Trainer(c, str(tmp_path / "fill"), progress=False, reward_fn=fake_scores)
    (m,) = tr.train()
    tr.close()
    # each generation batch of 2 prompts keeps 1 mixed group: 3 batches for 3 groups
    assert m["train/num_gen_batches"] == 3
    assert m["train/num_samples"] == 12
    assert m["critic/acc/mean"] == 0.5  # only mixed groups were trained on
    assert m["dynamic_sampling/frac_all_correct"] == pytest.approx(0.5)

    # The cap: "error" stops with a message that says what to change...
    c = small_config(**{"trainer.total_steps": 1, "trainer.train_batch_size": 3,
                        "trainer.gen_batch_size": 2, "trainer.mini_batch_size": 12,
                        "trainer.micro_batch_size": 4, "algo.overlong_buffer.enable": False,
                        "algo.dynamic_sampling.max_num_gen_batches": 2,
                        "algo.dynamic_sampling.on_cap": "error"})
    tr = Trainer(c, str(tmp_path / "cap_error"), progress=False, reward_fn=fake_scores)
    with pytest.raises(algo.DynamicSamplingCapError, match="max_num_gen_batches"):
        tr.train()
    tr.close()
    # ...and "proceed" trains on the 2 groups collected so far (never an empty batch).
    c.algo.dynamic_sampling.on_cap = "proceed"
    tr = Trainer(c, str(tmp_path / "cap_proceed"), progress=False, reward_fn=fake_scores)
    (m,) = tr.train()
    tr.close()
    assert m["train/num_gen_batches"] == 2 and m["train/num_samples"] == 8
