"""The toy supervised warm start: target texts (format noise), SFT batch packing, loss goes down."""

import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import models
from dapo_jax.training.warm_start import pack_sft_batch, supervised_warm_start, warm_start_examples
from data_pipeline.toy_arithmetic import ToyArithmeticConfig, generate_toy_arithmetic


@pytest.fixture(scope="module")
def records():
    return generate_toy_arithmetic(ToyArithmeticConfig(num_train=400, num_heldout=10))["train"]


def test_every_problem_keeps_its_worked_solution_and_noise_is_a_weighted_bare_answer(records):
    index, texts, weights = warm_start_examples(records, format_noise=0.6)
    assert len(texts) == 2 * len(records) and sorted(set(index)) == list(range(len(records)))
    for i, t, w in zip(index, texts, weights):
        truth = records[i]["ground_truth"]
        if t.startswith("So the result is"):
            # No worked steps and no `Answer:` line: nothing shared with the rewarded format.
            assert t == f"So the result is {truth}." and w == pytest.approx(0.6)
        else:
            assert t.endswith(f"\nAnswer: {truth}") and " = " in t and w == pytest.approx(0.4)
    index, texts, weights = warm_start_examples(records, format_noise=0.0)
    assert len(texts) == len(records) and all("Answer:" in t for t in texts)
    index, texts, weights = warm_start_examples(records, format_noise=1.0)
    assert len(texts) == len(records) and not any("Answer:" in t for t in texts)


def test_format_noise_out_of_range_names_the_field(records):
    with pytest.raises(ValueError, match="warm_start.format_noise"):
        warm_start_examples(records, format_noise=1.5)


def test_pack_sft_batch_masks_only_response_tokens():
    ids, mask, target = pack_sft_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], length=6, pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 1, 2, 0], [8, 3, 4, 9, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(target, [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])


def test_supervised_warm_start_fits_a_fixed_response():
    cfg = models.preset("tiny", vocab_size=64)
    params = models.init_model(cfg, seed=0).params()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    responses = [[20, 21, 2], [22, 2], [23, 24, 25, 2]]
    params, losses = supervised_warm_start(params, cfg, prompts, responses, steps=40, batch_size=3,
                                           lr=1e-2, seed=0, pad_id=0, progress=False)
    assert len(losses) == 40
    assert losses[-1] < 0.2 * losses[0]


def test_supervised_warm_start_draws_in_proportion_to_weights():
    cfg = models.preset("tiny", vocab_size=64)
    params = models.init_model(cfg, seed=0).params()
    # Same prompt, two targets; all weight on the second: the model must learn only that one.
    prompts, responses = [[3, 4, 5], [3, 4, 5]], [[20, 2], [30, 2]]
    params, _ = supervised_warm_start(params, cfg, prompts, responses, steps=30, batch_size=4,
                                      lr=1e-2, seed=0, pad_id=0, weights=[0.0, 1.0],
                                      progress=False)
    logits = models.forward(models.model_from_params(cfg, params), jnp.asarray([[3, 4, 5]]))
    assert int(jnp.argmax(logits[0, -1])) == 30
    with pytest.raises(ValueError, match="weights"):
        supervised_warm_start(params, cfg, prompts, responses, steps=1, batch_size=2, lr=1e-3,
                              seed=0, pad_id=0, weights=[1.0], progress=False)
