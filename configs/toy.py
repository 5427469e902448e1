"""The embedded default (`make demo`): a tiny Qwen2 policy learns toy arithmetic with DAPO on CPU.

`--config configs/toy.py:<stage>` selects a Table 1 ablation stage (default: dapo).
"""

from configs.base import apply_ablation, get_base_config


def get_config(arg: str = "dapo"):
    """Toy DAPO run: minutes on 2 CPU cores."""
    c = get_base_config()
    c.seed = 0
    c.model.preset = "tiny"
    c.mesh.num_devices = 1  # tiny shapes: one CPU device is fastest
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.tokenizer.path = ""  # built by the demo from the toy corpus into <workdir>/toy_tokenizer
    c.data.train = "toy"
    c.data.val = ["toy"]
    c.data.template = "short"
    c.data.max_prompt_length = 48
    c.data.max_response_length = 32
    c.algo.overlong_buffer.len = 8
    c.rollout.n = 8
    c.rollout.max_concurrent_decodes = 128
    c.rollout.steps_per_sync = 8
    c.rollout.cache_dtype = "float32"
    c.algo.dynamic_sampling.max_num_gen_batches = 4
    c.algo.dynamic_sampling.on_cap = "proceed"
    c.optim.lr = 2e-4
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
    c.trainer.test_freq = 10
    c.trainer.val_before_train = True
    c.warm_start.steps = 150
    c.warm_start.batch_size = 64
    c.warm_start.lr = 3e-3
    c.eval.n = 4
    c.eval.top_p = 1.0
    c.eval.max_problems = 100
    return apply_ablation(c, arg or "dapo")
