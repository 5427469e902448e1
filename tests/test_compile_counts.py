"""After warm-up, training steps, rollouts and evaluations build no new programs.

Counted by JAX's own trace / lowering / compile events (tests/compile_counter.py), so a jit object
created anew (a program rebuilt on every weight swap or every decode-state reset) is caught even
when the persistent compilation cache spares it the XLA time.
"""

import jax
import jax.numpy as jnp

from dapo_jax.training.trainer import Trainer
from tests.compile_counter import count_compiles
from tests.test_trainer import small_config, text_hash_scores


def test_counter_sees_a_rebuilt_program_even_when_the_persistent_cache_serves_it():
    x = jnp.arange(4.0)

    def build():
        return jax.jit(lambda v: v * 3.0 + 1.0)  # a new closure: a new program for JAX

    f = build()
    f(x)  # compiled once; tests/conftest.py's persistent cache now holds it
    with count_compiles() as reused:
        f(x)
    with count_compiles() as rebuilt:
        build()(x)
    assert reused.total == 0, str(reused)
    assert (len(rebuilt.traces), len(rebuilt.lowerings), len(rebuilt.compiles)) == (1, 1, 1), \
        str(rebuilt)
    assert rebuilt.persistent_cache_hits == 1, str(rebuilt)


def test_training_steps_rollouts_and_evaluations_after_warmup_compile_nothing(tmp_path):
    # Dynamic sampling off: one generation batch per step, so every step runs the same programs.
    # 2 prompts x 4 samples (train) and 4 problems x 2 samples (eval) fit the 16 decode slots at
    # once, so every insert has the same width; the toy prompts all fall in one prefill bucket.
    c = small_config(**{"data.val": ["toy"], "eval.n": 2, "eval.max_problems": 4,
                        "algo.dynamic_sampling.enable": False, "trainer.gen_batch_size": 2})
    tr = Trainer(c, str(tmp_path), progress=False, reward_fn=text_hash_scores)
    with count_compiles() as warmup:
        tr.train_step()  # rollout, old log-probs, updates, driver.update_params
        tr.evaluate()
    # The counter hears this JAX's events (a renamed event would make every check below vacuous).
    assert warmup.compiles and warmup.traces and warmup.lowerings, str(warmup)

    with count_compiles() as steps:
        tr.train_step()  # rolls out on the evaluation's decode state
        tr.train_step()  # as in train() between evaluations: the last step freed the sampler state
    # The last step freed the sampler's state too: the evaluation makes a new one, on eval sampling.
    with count_compiles() as evaluation:
        tr.evaluate()
    # A rollout back on the training sampling, reusing the evaluation's decode state.
    with count_compiles() as rollout:
        tr._generation_batch(next(tr.data_iter))
    tr.close()
    assert steps.total == 0, f"training steps 2 and 3: {steps}"
    assert evaluation.total == 0, f"second evaluation: {evaluation}"
    assert rollout.total == 0, f"rollout after the evaluation: {rollout}"
