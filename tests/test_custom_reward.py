"""`reward.fn = "package.module:function"`: loaded and checked at start-up, used by the trainer."""

import pytest

from configs.base import get_base_config
from dapo_jax.config_validation import ConfigError, validate_config
from dapo_jax.rewards.custom import RewardFnError, load_reward_fn
from dapo_jax.training.trainer import configured_reward


def ends_with_truth(texts, truths):
    """A custom reward for the tests: correct when the response ends with the ground truth."""
    return [{"score": 1.0 if t.endswith(g) else -1.0, "acc": t.endswith(g)}
            for t, g in zip(texts, truths)]


def takes_one_argument(texts):
    return [{"score": 0.0, "acc": False} for _ in texts]


NOT_A_FUNCTION = 3


def test_the_named_function_replaces_the_scorer():
    c = get_base_config()
    c.reward.fn = "tests.test_custom_reward:ends_with_truth"
    reward = configured_reward(c)
    assert reward is ends_with_truth
    assert [r["acc"] for r in reward(["so 12", "Answer: 12", "13"], ["12", "13", "13"])] == [
        True, False, True]
    c.reward.fn = ""
    # The default is the rule-based scorer: "Answer: 12" is right for 12 and nothing else is.
    assert [r["acc"] for r in configured_reward(c)(["so 12", "Answer: 12"], ["12", "12"])] == [
        False, True]


@pytest.mark.parametrize("spec, message", [
    ("tests.test_custom_reward", "write it as 'package.module:function'"),
    ("no_such_package.rewards:score", "cannot import module 'no_such_package.rewards'"),
    ("tests.test_custom_reward:missing", "has no attribute 'missing'"),
    ("tests.test_custom_reward:NOT_A_FUNCTION", "is a int, not a function"),
    ("tests.test_custom_reward:takes_one_argument", r"must accept \(texts, ground_truths\)"),
])
def test_a_bad_reward_fn_names_the_field_and_the_fix(spec, message):
    with pytest.raises(RewardFnError, match=message) as info:
        load_reward_fn(spec)
    assert "config.reward.fn" in str(info.value)


def test_validation_rejects_a_malformed_reward_fn():
    c = get_base_config()
    c.model.preset = "tiny"
    c.reward.fn = "module.without.function"
    with pytest.raises(ConfigError, match="reward.fn: must be '' or 'package.module:function'"):
        validate_config(c)
