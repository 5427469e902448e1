"""Multi-process SPMD on localhost CPU: 2 processes x 4 devices train exactly like 1 process x 8 devices.

The reduced form of `scripts/multihost_check.py` (which adds the SFT warm start and a tensor axis):
real `jax.distributed` processes started through the training CLI, compared with an in-process
single-process run of the same config. The mesh is pure FSDP over all 8 devices, so every
parameter, gradient and optimizer moment is split across the two processes.
"""

import subprocess

import jax
import numpy as np

from dapo_jax.runtime.host_transfer import tree_to_host
from dapo_jax.training.trainer import Trainer
from scripts import multihost_check as mc

# Pure FSDP over 8 devices: each process holds half of every weight (a tensor axis would stay inside
# one process here and doubles the compile time; the script checks data=1, fsdp=4, tensor=2).
OVERRIDES = mc.toy_overrides({"mesh.fsdp": -1, "mesh.tensor": 1, "trainer.micro_batch_size": 8,
                              "trainer.save_every": 100})
TIMEOUT_S = 600


def _cache_dir():
    return jax.config.jax_compilation_cache_dir


def test_two_processes_log_the_metrics_and_save_the_state_of_one_process(tmp_path):
    """2 x 4-device processes (CLI, coordinator on 127.0.0.1) vs 1 x 8-device in-process reference.

    Proves: both processes finish 2 steps with exit code 0; only process 0 writes metrics.jsonl and
    its records equal the reference's within 2e-6 of each metric's size (rollouts, rewards, dynamic
    sampling with carry-over, old log-probs and the AdamW update all agree, so step 2 samples from
    the same updated weights); and the checkpoint both processes wrote into one directory holds the
    whole state: a 1-process trainer restores from it the reference's AdamW moments (the
    gradients) within 1e-5 of each tensor's size, its weight updates within 0.5% of their size,
    and its sampling state. Tolerances are fractions of the values compared, never fixed amounts:
    an absolute 1e-6 is 1% of an update of lr 1e-4, and larger than most second moments.
    """
    config = mc.make_config(OVERRIDES)
    assert jax.device_count() == 8
    ref = Trainer(config, str(tmp_path / "single"), progress=False,
                  reward_fn=mc.byte_parity_reward)
    start_params = tree_to_host(ref.params)
    reference = ref.train()
    ref_params, ref_opt = tree_to_host(ref.params), tree_to_host(ref.opt_state)
    ref_acc = ref.accumulator.state_dict()
    ref.close()
    assert reference[-1]["actor/grad_norm"] > 0  # the stand-in reward gives real gradients

    multi = tmp_path / "multi"
    # Two fresh processes would both build the toy tokenizer into the shared workdir at once (a race
    # the trainer does not guard yet); start them from the reference's, which is the same file.
    run = mc.launch(multi, OVERRIDES, num_processes=2, devices_per_process=4, timeout=TIMEOUT_S,
                    compilation_cache_dir=_cache_dir())
    assert not run.timed_out and run.returncodes == [0, 0], run.log_tail()

    logged = mc.read_metrics(multi)
    assert [r["step"] for r in logged] == [1, 2]  # process 0 only: no duplicated lines
    expected = [{"step": i + 1, **m} for i, m in enumerate(reference)]
    # Seen on CPU: within 1e-7 of each metric's size (compare_metrics says what size means).
    problems = mc.compare_metrics(expected, logged, rtol=2e-6)
    assert not problems, "\n".join(problems)
    assert mc.checkpoint_steps(multi) == [2]

    restored = Trainer(config, str(multi), progress=False,
                       reward_fn=mc.byte_parity_reward)
    assert restored.step == 2
    # Seen on CPU: moments within 1e-6 of their size, updates within 5e-4 (Adam's steps are ~lr
    # whatever the gradient's size, so a coordinate with a tiny gradient carries its noise).
    problems = mc.tree_differences(ref_opt, tree_to_host(restored.opt_state), rtol=1e-5)
    problems += mc.tree_differences(ref_params, tree_to_host(restored.params), rtol=5e-3,
                                    start=start_params)
    assert not problems, "\n".join(problems)
    acc = restored.accumulator.state_dict()
    assert acc.keys() == ref_acc.keys()
    problems = mc.tree_differences({k: np.asarray(v) for k, v in ref_acc.items()},
                                   {k: np.asarray(v) for k, v in acc.items()}, rtol=1e-5)
    assert not problems, "\n".join(problems)
    restored.close()


def test_processes_that_do_not_share_the_workdir_stop_with_a_message(tmp_path):
    """Per-host local workdirs would save checkpoint shards nobody can restore: refused at start."""
    port = mc.free_port()
    env = mc.subprocess_env(1)
    procs, logs = [], []
    for i in range(2):
        workdir = tmp_path / f"host{i}"  # each process its own directory: not shared
        log = tmp_path / f"process_{i}.log"
        cmd = mc.train_command(workdir, OVERRIDES, stand_in_reward=False, process_id=i,
                               num_processes=2, port=port)
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=mc.REPO_ROOT, env=env, stdout=f,
                                             stderr=subprocess.STDOUT))
        logs.append(log)
    run = mc.wait(procs, logs, timeout=180)
    assert not run.timed_out, run.log_tail()
    assert all(rc not in (0, None) for rc in run.returncodes), run.log_tail()
    text = logs[0].read_text()
    assert "is not shared: process(es) [1] cannot see a file process 0 wrote" in text, run.log_tail()
    assert not list((tmp_path / "host0").glob(".shared_check_*"))  # the probe is cleaned up
