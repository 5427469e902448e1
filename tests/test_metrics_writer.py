"""Metrics are held once per step: one object per step, records past the restored checkpoint dropped,
TensorBoard told to purge replayed steps, and a real `kill -9` between a step's metrics and its
checkpoint leaves no duplicate after the resume. Optional W&B logging with a fake `wandb` module."""

import glob
import os
import signal
import struct
import sys
import time
import types

import jax
from tensorboardX.proto import event_pb2

from dapo_jax.training import metrics_writer
from dapo_jax.training.metrics_writer import MetricsWriter, read_metrics
from scripts import multihost_check as mc


def _tensorboard_scalars(logdir) -> dict[tuple[str, int], list[float]]:
    """{(tag, step): values} as TensorBoard shows them: event files in creation order, and a
    SessionLog START at step s drops every earlier event at step >= s (TensorBoard's purge rule)."""
    shown: dict[tuple[str, int], list[float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")),
                       key=os.path.getmtime):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                shown = {k: v for k, v in shown.items() if k[1] < event.step}
            for value in event.summary.value:
                shown.setdefault((value.tag, event.step), []).append(value.simple_value)
    return shown


def test_each_step_is_one_object_and_a_rewrite_replaces_it(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write(1, {"a": 1.0})
    w.write(2, {"a": 2.0, "bad": float("nan")})
    w.write(1, {"a": 10.0})
    w.close()
    names = sorted(os.listdir(tmp_path / "metrics"))
    assert names == ["step_00000001.jsonl", "step_00000002.jsonl"]
    assert read_metrics(tmp_path) == [{"step": 1, "a": 10.0}, {"step": 2, "a": 2.0}]


def test_resume_drops_every_record_past_the_restored_step(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in range(5):
        w.write(s, {"a": float(s)})
    w.close()
    w = MetricsWriter(tmp_path)
    w.resume_from(2)
    w.write(3, {"a": 30.0})
    w.close()
    assert read_metrics(tmp_path) == [{"step": 0, "a": 0.0}, {"step": 1, "a": 1.0},
                                      {"step": 2, "a": 2.0}, {"step": 3, "a": 30.0}]


def test_legacy_metrics_jsonl_is_read_once_per_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 2, "a": 3.0}\n')
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 3.0}]
    assert read_metrics(tmp_path / "absent") == []


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in (1, 2, 3):
        w.write(s, {"a": float(s)})
    w.close()
    time.sleep(1.1)  # event file names carry the second they were opened
    w = MetricsWriter(tmp_path)
    w.resume_from(1)  # steps 2 and 3 are replayed with new values
    for s in (2, 3, 4):
        w.write(s, {"a": 10.0 * s})
    w.close()
    shown = _tensorboard_scalars(tmp_path / "tensorboard")
    assert shown == {("a", 1): [1.0], ("a", 2): [20.0], ("a", 3): [30.0], ("a", 4): [40.0]}


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path, enabled=False)
    w.resume_from(0)
    w.write(1, {"a": 1.0})
    w.close()
    assert not (tmp_path / "metrics").exists() and read_metrics(tmp_path) == []


def test_wandb_gets_the_same_metric_names_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        id = "run123"

        def log(self, data, step):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    settings = {"project": "dapo", "entity": "", "name": "", "config": {"seed": 0}}
    w = MetricsWriter(tmp_path, wandb=settings)
    w.write(1, {"critic/score/mean": 0.5, "bad": float("inf")})
    w.close()
    w = MetricsWriter(tmp_path, wandb=settings)
    w.write(2, {"critic/score/mean": 0.25})
    w.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["project"] == "dapo" and inits[0]["id"] is None
    assert inits[0]["name"] == tmp_path.name and inits[0]["config"] == {"seed": 0}
    assert inits[1]["id"] == "run123" and inits[1]["resume"] == "allow"  # the same W&B run
    assert [c for c in calls if c[0] == "log"] == [("log", {"critic/score/mean": 0.5}, 1),
                                                   ("log", {"critic/score/mean": 0.25}, 2)]
    assert (tmp_path / "run" / "wandb_id").read_text() == "run123"


def test_wandb_is_not_imported_when_no_project_is_set(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would raise ImportError
    w = MetricsWriter(tmp_path, wandb={"project": ""})
    w.write(1, {"a": 1.0})
    w.close()
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]


KILL_OVERRIDES = mc.toy_overrides({"mesh.num_devices": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
                                   "trainer.total_steps": 999, "trainer.save_every": 3, "seed": 1})


def test_kill_9_after_a_steps_metrics_and_before_its_checkpoint_logs_each_step_once(tmp_path):
    """Real `kill -9` of a real `dapo_jax.train` process right after it logged a step that has no
    checkpoint (save_every=3: steps 4 and 5 are logged before checkpoint 6), then a real resume.

    Proves: the killed run left records past its last checkpoint (what the resume replays), and
    after the resume metrics/ and TensorBoard hold every step 1..total once.
    """
    workdir = tmp_path / "run"
    cache = jax.config.jax_compilation_cache_dir
    procs, logs = mc.start(workdir, KILL_OVERRIDES, devices_per_process=1,
                           compilation_cache_dir=cache)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and procs[0].poll() is None:
        if mc.last_logged_step(workdir) >= 4:
            break
        time.sleep(0.005)
    assert procs[0].poll() is None, mc.wait(procs, logs, 1).log_tail()
    os.kill(procs[0].pid, signal.SIGKILL)
    mc.wait(procs, logs, timeout=60)
    logged = mc.last_logged_step(workdir)
    checkpointed = max(mc.checkpoint_steps(workdir), default=0)
    assert logged > checkpointed, (logged, checkpointed)  # the window the old writer duplicated

    total = logged + 2
    run = mc.launch(workdir, {**KILL_OVERRIDES, "trainer.total_steps": total},
                    devices_per_process=1, timeout=300, compilation_cache_dir=cache,
                    log_dir=tmp_path / "resume")
    assert run.returncodes == [0], run.log_tail()
    assert f"at step {checkpointed}" in run.logs[0].read_text() or checkpointed == 0
    files = sorted(os.listdir(workdir / "metrics"))
    assert files == [f"step_{s:08d}.jsonl" for s in range(1, total + 1)]
    lines = [line for f in files for line in (workdir / "metrics" / f).read_text().splitlines()]
    assert len(lines) == total
    assert [r["step"] for r in metrics_writer.read_metrics(workdir)] == list(range(1, total + 1))
    shown = _tensorboard_scalars(workdir / "tensorboard")
    steps_of = {}
    for (tag, step), values in shown.items():
        assert len(values) == 1, (tag, step, values)
        steps_of.setdefault(tag, set()).add(step)
    assert steps_of["critic/score/mean"] == set(range(1, total + 1))
