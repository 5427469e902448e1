"""Host-side batch layout: samples -> padded rows, and rows -> optimizer mini/micro-batches.

A row is [left-padded prompt of P tokens | right-padded response of R tokens]: the prompt's last
token sits at P - 1 for every row, so response position j is row position P + j everywhere.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Fields of one generation batch that the update reads (others are metrics-only).
ROW_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_logprobs")


def pad_rows(prompts: Sequence[Sequence[int]], responses: Sequence[np.ndarray],
             logprobs: Sequence[np.ndarray], *, prompt_length: int, response_length: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """[N, P] / [N, R] arrays of N (prompt, response, rollout log-prob) triples."""
    n, p, r = len(responses), prompt_length, response_length
    out = {"prompt_ids": np.full((n, p), pad_id, np.int32), "prompt_mask": np.zeros((n, p), np.int32),
           "response_ids": np.full((n, r), pad_id, np.int32),
           "response_mask": np.zeros((n, r), np.int32),
           "rollout_logprobs": np.zeros((n, r), np.float32)}
    for i, (prompt, resp, lp) in enumerate(zip(prompts, responses, logprobs)):
        if len(prompt) > p or len(resp) > r:
            raise ValueError(f"sample {i}: prompt {len(prompt)} / response {len(resp)} tokens exceed "
                             f"the row's {p} / {r}")
        out["prompt_ids"][i, p - len(prompt):] = prompt
        out["prompt_mask"][i, p - len(prompt):] = 1
        out["response_ids"][i, :len(resp)] = resp
        out["response_mask"][i, :len(resp)] = 1
        out["rollout_logprobs"][i, :len(resp)] = lp
    return out


def minibatches(arrays: dict[str, np.ndarray], *, mini_batch_size: int, micro_batch_size: int
                ) -> list[dict[str, np.ndarray]]:
    """Splits [N, ...] arrays into mini-batches laid out [num_micro, micro, ...].

    A short last mini-batch (dynamic sampling's "proceed" cap) is padded with all-zero rows, which
    carry no response tokens and so contribute nothing to any loss or count.
    """
    n = next(iter(arrays.values())).shape[0]
    n_mini = max(1, math.ceil(n / mini_batch_size))
    pad = n_mini * mini_batch_size - n
    if pad:
        arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                  for k, v in arrays.items()}
    per = mini_batch_size // micro_batch_size
    return [{k: v[i * mini_batch_size:(i + 1) * mini_batch_size].reshape(
        (per, micro_batch_size) + v.shape[1:]) for k, v in arrays.items()} for i in range(n_mini)]
