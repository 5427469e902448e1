"""Preemption: a SIGTERM finishes the current step, checkpoints it, exits 42; the restart carries on
exactly as if nothing had happened."""

import signal
import subprocess
import time

import jax
import pytest

from dapo_jax.training.trainer import PREEMPTED_EXIT_CODE, Preempted, Trainer
from scripts import multihost_check as mc
from tests.state_checks import assert_bitwise_equal, assert_metrics_equal, host_state

# One device (fastest on CPU). save_every is far beyond total_steps, so the only checkpoint before
# the end is the one the SIGTERM forces.
TOTAL_STEPS = 6
OVERRIDES = mc.toy_overrides({"mesh.num_devices": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
                              "trainer.total_steps": TOTAL_STEPS, "trainer.save_every": 1000,
                              # 3x the groups a step needs: surplus groups are carried over at
                              # every step whatever the sampler's random stream.
                              "trainer.gen_batch_size": 6, "seed": 2})
# Compiled steps take ~0.1 s here: the run to be preempted gets a horizon it cannot reach before the
# signal lands. total_steps changes nothing else (no decay schedule, endless data).
UNREACHABLE = {**OVERRIDES, "trainer.total_steps": 999}


def _cache_dir():
    return jax.config.jax_compilation_cache_dir


def _wait_for_step(proc: subprocess.Popen, workdir, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if mc.last_logged_step(workdir) >= step:
            return
        time.sleep(0.005)  # steps take ~0.1 s: signal within the step after `step`


def test_sigterm_mid_run_checkpoints_and_the_restart_matches_the_uninterrupted_run(tmp_path):
    """Real signal to a real `dapo_jax.train` process (stand-in reward), then a real restart.

    Proves: the process exits with PREEMPTED_EXIT_CODE after the step it was in, leaving exactly one
    checkpoint, at that step (save_every would have written none); the restart resumes there and
    logs each remaining step once; every logged step, before and after the preemption, equals
    an uninterrupted in-process run of the same config exactly (params, AdamW moments, the data
    iterator, the sampling seed counter and dynamic-sampling carry-over all survive the
    checkpoint); and the final checkpoint holds that run's parameters and optimizer state bit for
    bit.
    """
    full = Trainer(mc.make_config(OVERRIDES), str(tmp_path / "full"), progress=False,
                   reward_fn=mc.byte_parity_reward)
    reference = full.train()
    reference_state = host_state(full)
    reference_acc = full.accumulator.state_dict()
    full.close()
    # Groups are carried over after each of steps 1-3: the checkpoint at the stop holds pending groups.
    assert all(r["dynamic_sampling/carried_over_groups"] > 0 for r in reference[:3]), reference[:3]

    workdir = tmp_path / "preempted"
    procs, logs = mc.start(workdir, UNREACHABLE, devices_per_process=8,
                           compilation_cache_dir=_cache_dir())
    proc = procs[0]
    _wait_for_step(proc, workdir, 1, timeout=300)
    assert proc.poll() is None, mc.wait(procs, logs, 1).log_tail()
    proc.send_signal(signal.SIGTERM)
    run = mc.wait(procs, logs, timeout=120)
    assert run.returncodes == [PREEMPTED_EXIT_CODE], run.log_tail()
    stopped_at = [r["step"] for r in mc.read_metrics(workdir)]
    k = stopped_at[-1]
    assert stopped_at == list(range(1, k + 1)) and k < TOTAL_STEPS, stopped_at
    assert mc.checkpoint_steps(workdir) == [k]
    assert f"SIGTERM after step {k}" in logs[0].read_text(), run.log_tail()

    run = mc.launch(workdir, OVERRIDES, devices_per_process=8, timeout=300,
                    compilation_cache_dir=_cache_dir(), log_dir=tmp_path / "restart")
    assert run.returncodes == [0], run.log_tail()
    logged = mc.read_metrics(workdir)
    assert [r["step"] for r in logged] == list(range(1, TOTAL_STEPS + 1))
    expected = [{"step": i + 1, **m} for i, m in enumerate(reference)]
    for want, have in zip(expected, logged):
        assert_metrics_equal(want, have)
    assert mc.checkpoint_steps(workdir) == [k, TOTAL_STEPS]
    final = Trainer(mc.make_config(OVERRIDES), str(workdir), progress=False,
                    reward_fn=mc.byte_parity_reward)
    assert final.step == TOTAL_STEPS
    assert_bitwise_equal(reference_state, host_state(final))
    assert_bitwise_equal(reference_acc, final.accumulator.state_dict())
    final.close()


def test_sigterm_stops_after_the_current_step_and_the_checkpoint_holds_its_state(tmp_path):
    """In process, the handler called during step 1 (deterministic stop point).

    Proves: step 1 completes, `Preempted` is raised before step 2 starts, and a trainer restarted
    on the workdir holds bit-identical parameters, optimizer state, accumulator, data-iterator
    position and generation counter. A SIGTERM during the last step ends the run normally (the
    final checkpoint is the one that step saves anyway; exit code 0, not 42).
    """
    config = mc.make_config({**OVERRIDES, "trainer.total_steps": 2})
    tr = Trainer(config, str(tmp_path), progress=False, reward_fn=mc.byte_parity_reward)
    step_fn = tr.train_step
    steps_started = []

    def step_with_sigterm():
        steps_started.append(tr.step + 1)
        metrics = step_fn()
        tr.stop.request()  # as if the signal came while this step ran
        return metrics

    tr.train_step = step_with_sigterm
    with pytest.raises(Preempted, match="after step 1"):
        tr.train()
    assert steps_started == [1] and tr.step == 1
    assert mc.checkpoint_steps(tmp_path) == [1]
    state = host_state(tr)
    acc, data_state, drawn = tr.accumulator.state_dict(), tr.data_iter.get_state(), \
        tr.gen_batches_drawn
    tr.close()

    resumed = Trainer(config, str(tmp_path), progress=False,
                      reward_fn=mc.byte_parity_reward)
    assert resumed.step == 1 and resumed.gen_batches_drawn == drawn
    assert resumed.data_iter.get_state() == data_state
    assert_bitwise_equal(state, host_state(resumed))
    assert_bitwise_equal(acc, resumed.accumulator.state_dict())

    step_fn = resumed.train_step

    def last_step_with_sigterm():
        metrics = step_fn()
        resumed.stop.request()
        return metrics

    resumed.train_step = last_step_with_sigterm
    history = resumed.train()  # no Preempted: the run is complete
    resumed.close()
    assert len(history) == 1 and resumed.step == 2
    assert mc.checkpoint_steps(tmp_path) == [1, 2]
