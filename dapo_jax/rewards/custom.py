"""Reward functions named by import path in the config: `reward.fn = "package.module:function"`.

The function takes the generation batch's response texts and ground truths and returns one dict per
response with at least "score" (float) and "acc" (bool; what dynamic sampling filters on by default):

    def my_reward(texts: list[str], ground_truths: list[str]) -> list[dict]:
        return [{"score": 1.0 if t.strip().endswith(g) else -1.0, "acc": t.strip().endswith(g)}
                for t, g in zip(texts, ground_truths)]

DAPO's soft overlong punishment is added to "score" by the trainer, whatever the function.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from dapo_jax.runtime.cli_errors import UserError

RewardFn = Callable[[list[str], list[str]], list[dict]]


class RewardFnError(UserError):
    """`reward.fn` does not name a usable function; the message says why and how to fix it."""


def load_reward_fn(spec: str) -> RewardFn:
    """Imports `"package.module:function"` and checks it can be called with (texts, ground_truths)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFnError(f"config.reward.fn={spec!r}: write it as 'package.module:function', e.g. "
                            "'my_rewards.math:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFnError(f"config.reward.fn={spec!r}: cannot import module {module_name!r} ({e}); "
                            "is its package on PYTHONPATH (or installed)?") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardFnError(f"config.reward.fn={spec!r}: module {module_name!r} has no "
                                f"attribute {attr!r}")
    if not callable(fn):
        raise RewardFnError(f"config.reward.fn={spec!r}: {attr!r} is a {type(fn).__name__}, not a "
                            "function")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError as e:
        raise RewardFnError(f"config.reward.fn={spec!r}: it must accept (texts, ground_truths) "
                            f"({e})") from e
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn
