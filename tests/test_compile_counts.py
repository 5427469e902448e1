"""After warm-up, training steps, rollouts and evaluations build no new programs.

Counted by JAX's own trace / lowering / compile events (tests/compile_counter.py), so a jit object
created anew (a program rebuilt on every weight swap or every decode-state reset) is caught even
when the persistent compilation cache spares it the XLA time.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax.training.trainer import Trainer, _Timer
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
    # One packed row length, never cut, so every step's update uses the same programs whatever the
    # sampled lengths (the bound over buckets and cuts is the next test's).
    c = small_config(**{"data.val": ["toy"], "eval.n": 2, "eval.max_problems": 4,
                        "algo.dynamic_sampling.enable": False, "trainer.gen_batch_size": 2,
                        "trainer.packing_row_buckets": 1, "trainer.packing_trim_steps": 1})
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


def test_packed_updates_build_one_program_per_micro_batch_shape(tmp_path, monkeypatch):
    """Mini-batches of any lengths reuse the programs of their (rows, row length) shape, of which
    the layout allows a few: programs never exceed them, and new lengths whose shapes were seen
    compile nothing."""
    from dapo_jax.training import batching
    c = small_config()
    tr = Trainer(c, str(tmp_path), progress=False, reward_fn=text_hash_scores)
    n, R = c.trainer.mini_batch_size, tr.R
    rng = np.random.default_rng(0)
    shapes = []
    real_pack = batching.pack_minibatch

    def recording_pack(*args, **kwargs):
        pm = real_pack(*args, **kwargs)
        shapes.extend((rows, pm.row_length) for rows in pm.micro_rows)
        return pm

    monkeypatch.setattr(batching, "pack_minibatch", recording_pack)

    def batch(prompt_len: int, response_len: int) -> dict:
        lengths = np.minimum(rng.integers(1, response_len + 1, size=n), R)
        lengths[0] = response_len  # the longest sample picks the bucket
        out = {"prompt_ids": np.full((n, tr.P), 0, np.int32),
               "prompt_mask": np.zeros((n, tr.P), np.int32),
               "response_ids": rng.integers(3, 60, size=(n, R)).astype(np.int32),
               "response_mask": (np.arange(R)[None] < lengths[:, None]).astype(np.int32),
               "rollout_logprobs": np.full((n, R), -1.0, np.float32),
               "advantages": rng.normal(size=n).astype(np.float32), "in_loss": np.ones(n, np.int8)}
        out["prompt_ids"][:, tr.P - prompt_len:] = rng.integers(3, 60, size=(n, prompt_len))
        out["prompt_mask"][:, tr.P - prompt_len:] = 1
        return out

    assert len(tr.layout.buckets) == 3
    sizes = [(10, 2), (10, 12), (40, R), (4, 6), (30, R), (8, 10)]
    with count_compiles() as warmup:
        for p, r in sizes:
            tr._update_packed(batch(p, r), _Timer())
    assert warmup.compiles, str(warmup)
    # Short and long mini-batches: rows of several lengths, each a bucket's or one of its cuts.
    cuts = {cut for length, _ in tr.layout.buckets for cut in tr.layout.trimmed_lengths(length)}
    assert len({length for _, length in shapes}) >= 3
    assert {length for _, length in shapes} <= cuts
    assert set(shapes) <= tr.layout.shapes()
    seen = set(shapes)
    # New random lengths of the same sizes: packed into shapes already compiled, or counted.
    shapes.clear()
    with count_compiles() as later:
        for p, r in sizes:
            tr._update_packed(batch(p, r), _Timer())
    tr.close()
    assert set(shapes) <= seen  # (seeded: the second round's shapes were all seen in the first)
    assert later.total == 0, f"new lengths in known shapes: {later}"
    assert tr.grad_fn._cache_size() == len(seen) <= len(tr.layout.shapes())
    assert tr.packed_logprob_fn._cache_size() == tr.grad_fn._cache_size()
