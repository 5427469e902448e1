"""A real pretrained model learning with our DAPO on CPU: Qwen2.5-Coder-0.5B-Instruct on generated
arithmetic (3-digit addition and 2-digit by 1-digit multiplication), strict math_dapo reward.

What it is for: showing that the DAPO loop moves a real checkpoint (not the toy policy), with the
real chat template, tokenizer and stop tokens read from the GGUF file. The problems are
`data.train = "toy"` with `data.toy.kinds = "3+3,2*1"` (data_pipeline/toy_arithmetic.py); the prompt
is the short DAPO template ("... The last line is Answer: $Answer ... End with "Answer:"."),
rendered by the model's chat template with no system message. Held-out problems (100, never
trained on; the split is a hash of the problem) are scored mean@4 at the paper's validation
setting (temperature 1.0, top-p 0.7).

    python -m dapo_jax.train --config configs/qwen2_5_coder_0_5b_arith.py --workdir /tmp/arith

The weights come from $DAPO_TEST_MODELS (default ~/.cache/dapo_jax_test_models), fetched by
`../shared/models/get-real-weights`; `--config.model.path=...` points elsewhere.

Memory: float32 weights are required (at lr 1e-6 to 5e-6 an AdamW step, about lr per weight, is far
below bfloat16's rounding step at typical weight sizes, so bfloat16 weights would not move); weights
+ gradients + AdamW moments are 4 x 494 M x 4 bytes = 7.9 GB, plus the sampler's float32 copy (2 GB)
during rollouts and the activations: plan for 18 GB of RAM.

Measured (docs/real_weights.md, 2-core CPU): 20 steps took held-out mean@4 from 0.385 to 0.838
(step 10) and 0.803 (step 20); the model learned the strict `Answer: N` format (48.5% -> 100% of
samples), not better arithmetic. Median 200 s per step (77-122 s with the machine to itself), 17.5 GB
peak RSS, a 5.4 GB final checkpoint. The same config with SmolLM2-135M-Instruct
(`--config.model.path=.../smollm2-135m-instruct.gguf`) fits in 4.2 GB but scores held-out mean@4 =
0.0075 before training (it rarely writes the `Answer:` line), too few mixed-reward groups to learn
from in 20 steps.
"""

import os

from configs.base import get_base_config

MODELS_DIR = os.environ.get("DAPO_TEST_MODELS") or os.path.expanduser("~/.cache/dapo_jax_test_models")


def get_config(arg: str = ""):
    """DAPO on CPU; `:short` = 2 steps, no validation (a check of the wiring)."""
    c = get_base_config()
    c.seed = 0
    c.model.path = os.path.join(MODELS_DIR, "qwen2.5-coder-0.5b-instruct.gguf")
    c.model.param_dtype = "float32"  # see the docstring: bfloat16 weights would not move at this lr
    c.model.dtype = "float32"  # XLA:CPU has no fast bfloat16 matmuls on this class of CPU
    c.model.remat = "full"
    c.mesh.num_devices = 1

    c.data.train = "toy"
    c.data.val = ("toy",)
    c.data.template = "short"
    c.data.toy.kinds = "3+3,2*1"  # 3-digit addition, 2-digit x 1-digit multiplication
    c.data.toy.num_train = 1000
    c.data.toy.num_heldout = 100
    c.data.max_prompt_length = 64
    c.data.max_response_length = 64
    c.algo.overlong_buffer.len = 16  # soft punishment over the last 16 of the 64 tokens (Eq. 13)

    c.rollout.n = 8
    c.rollout.max_concurrent_decodes = 128
    c.rollout.steps_per_sync = 16
    c.rollout.cache_dtype = "float32"

    c.algo.dynamic_sampling.max_num_gen_batches = 3
    c.algo.dynamic_sampling.on_cap = "proceed"  # a short CPU run: train on what was found

    c.optim.lr = 5e-6  # 20 updates: large enough to move within the run, Adam steps ~lr per weight
    c.optim.warmup_steps = 1
    c.optim.weight_decay = 0.0  # 20-odd steps: decay toward zero would only add noise

    c.trainer.total_steps = 20
    c.trainer.train_batch_size = 8  # prompt groups per step: 8 x 8 = 64 samples
    c.trainer.gen_batch_size = 8
    c.trainer.mini_batch_size = 64  # one optimizer update per step (on-policy)
    c.trainer.micro_batch_size = 16
    c.trainer.max_tokens_per_micro_batch = 2048
    c.trainer.logprob_chunk_size = 64
    c.trainer.save_every = 1000  # a checkpoint is 5.4 GB (weights + AdamW): only the final one
    c.trainer.keep_checkpoints = 1
    c.trainer.test_freq = 10
    c.trainer.val_before_train = True

    c.eval.n = 4
    c.eval.temperature = 1.0
    c.eval.top_p = 0.7  # the paper's validation setting
    c.eval.max_problems = 100

    if arg == "short":
        c.trainer.total_steps = 2
        c.trainer.test_freq = 0
        c.trainer.val_before_train = False
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use '' or 'short'")
    return c
