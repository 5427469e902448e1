"""The embedded default (`make demo`): a tiny Qwen2 policy learns toy arithmetic with DAPO on CPU.

`--config configs/toy.py:<stage>` selects a Table 1 ablation stage (default: dapo).
"""

from configs.base import apply_ablation, get_base_config


def get_config(arg: str = "dapo"):
    """Toy DAPO run: minutes on 2 CPU cores."""
    c = get_base_config()
    c.seed = 0
    c.model.preset = "toy"
    c.mesh.num_devices = 1  # tiny shapes: one CPU device is fastest
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.tokenizer.path = ""  # built by the demo from the toy corpus into <workdir>/toy_tokenizer
    c.data.train = "toy"
    c.data.val = ("toy",)
    c.data.template = "short"
    c.data.max_prompt_length = 48
    c.data.max_response_length = 40
    c.algo.overlong_buffer.len = 8
    # Three one-digit operands: every step of a held-out chain ("8 + 9 = 17", "17 + 1 = 18") is a
    # step the warm start has seen, so held-out problems test composition, not memorisation.
    c.data.toy.min_operands = 3
    c.data.toy.max_operands = 3
    c.data.toy.min_digits = 1
    c.data.toy.max_digits = 1
    c.data.toy.operators = "+"
    c.data.toy.num_train = 800
    c.data.toy.num_heldout = 100
    c.rollout.n = 8
    c.rollout.max_concurrent_decodes = 128
    c.rollout.steps_per_sync = 8
    c.rollout.cache_dtype = "float32"
    c.algo.dynamic_sampling.max_num_gen_batches = 4
    c.algo.dynamic_sampling.on_cap = "proceed"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.trainer.total_steps = 30
    c.trainer.train_batch_size = 16
    c.trainer.gen_batch_size = 24
    c.trainer.mini_batch_size = 64
    c.trainer.micro_batch_size = 64
    c.trainer.logprob_chunk_size = 128
    c.trainer.save_every = 10
    c.trainer.keep_checkpoints = 2
    c.trainer.test_freq = 5
    c.trainer.val_before_train = True
    # Many small steps learn the arithmetic far better than few large ones (same tokens seen).
    c.warm_start.steps = 600
    c.warm_start.batch_size = 32
    c.warm_start.lr = 3e-3
    # Half the warm-start targets are a bare "So the result is N.", which the DAPO reward cannot read:
    # the policy has to find the rewarded `Answer:` format through RL, as base models do.
    c.warm_start.format_noise = 0.5
    c.eval.n = 4
    c.eval.top_p = 0.7  # the paper's validation setting (temperature 1.0, top-p 0.7)
    c.eval.max_problems = 100
    return apply_ablation(c, arg or "dapo")
