"""gs:// end to end against a local GCS emulator (gcp-storage-emulator, started and stopped here).

A toy run trains with `--workdir gs://bucket/run`, is SIGKILLed after its first checkpoint, resumes to
completion, is evaluated (`evaluate --checkpoint gs://...`) and exported (`export --out gs://...`).
Every client is pointed at the emulator by environment variables, as a user would point them at a
test bucket: STORAGE_EMULATOR_HOST (gcsfs, hence etils.epath, and google-cloud-storage, hence
TensorBoard) and TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore, hence Orbax).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from dapo_jax import models
from dapo_jax.models.sharding import make_mesh
from dapo_jax.training import checkpointing
from dapo_jax.training.metrics_writer import read_metrics
# Not tests.conftest (it asks for 8 CPU devices): the trainer subprocesses import this module for
# reward.fn and keep their one device.
from tests.test_trainer import text_hash_scores

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bucket"
TOTAL_STEPS = 3
# The toy config at test size (tests/test_trainer.py's small_config, no warm start, no dynamic
# sampling), with a deterministic reward that gives mixed groups, so every step updates the policy.
TRAIN_FLAGS = [
    "--config=configs/toy.py", "--config.model.preset=tiny", "--config.data.toy.num_train=64",
    "--config.data.toy.num_heldout=8", "--config.warm_start.steps=0", "--config.rollout.n=4",
    "--config.rollout.max_concurrent_decodes=16", "--config.data.max_response_length=12",
    "--config.algo.overlong_buffer.len=4", "--config.trainer.train_batch_size=2",
    "--config.trainer.gen_batch_size=2", "--config.algo.dynamic_sampling.enable=False",
    "--config.trainer.mini_batch_size=4", "--config.trainer.micro_batch_size=2",
    f"--config.trainer.total_steps={TOTAL_STEPS}", "--config.trainer.save_every=1",
    "--config.trainer.test_freq=0", "--config.trainer.val_before_train=False",
    "--config.algo.overlong_filter=False",
    "--config.reward.fn=tests.test_gcs_emulator:stalling_reward",
]
_CALLS = [0]


def stalling_reward(texts: list[str], truths: list[str]) -> list[dict]:
    """tests.test_trainer's stand-in reward; with DAPO_TEST_STALL set, every call after the first
    hangs, so the run sits in step 2 after checkpointing step 1 until the test kills it."""
    _CALLS[0] += 1
    if _CALLS[0] > 1 and os.environ.get("DAPO_TEST_STALL"):
        time.sleep(600)
    return text_hash_scores(texts, truths)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reset_gcs_clients() -> None:
    """Forgets cached gcsfs filesystems (they keep the endpoint they were made with)."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    type(backend.fsspec_backend)._get_filesystem.cache_clear()


def _send_generation_headers() -> None:
    """Makes the emulator's media downloads carry `x-goog-generation`, as real GCS's do.

    TensorStore (Orbax's OCDBT manifests) reads an object's generation from that header and fails
    with "Malformed StorageGeneration" without it; gcp-storage-emulator only puts the generation in
    its JSON metadata. Idempotent.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_sends_generation", False):
        return
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    download._sends_generation = True
    objects.download = download  # objects.get(alt=media) looks it up here
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is plain:
                handlers[method] = download


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on a free localhost port with one bucket; yields the environment that points
    gcsfs / epath / google-cloud-storage / TensorStore at it (also set in this process)."""
    from gcp_storage_emulator.server import create_server

    _send_generation_headers()
    port = _free_port()
    url = f"http://localhost:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           # gcsfs's hierarchical-namespace probe needs real credentials; plain buckets need none.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        _reset_gcs_clients()
        try:
            yield env
        finally:
            _reset_gcs_clients()
            server.stop()


def _run(module: str, *args: str, env: dict, timeout: int = 240, stall: bool = False,
         wait: bool = True):
    full_env = dict(os.environ, **env, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    full_env.pop("XLA_FLAGS", None)  # one CPU device, as the toy config asks
    full_env.pop("DAPO_TEST_STALL", None)
    if stall:
        full_env["DAPO_TEST_STALL"] = "1"
    cmd = [sys.executable, "-m", f"dapo_jax.{module}", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def _forget_listings() -> None:
    """Drops gcsfs's cached directory listings (new filesystems start empty): the subprocesses
    changed the bucket behind this process's back."""
    _reset_gcs_clients()


def _complete_steps(workdir: str) -> list[int]:
    _forget_listings()
    store = checkpointing.CheckpointStore(workdir)
    try:
        return store.all_steps()
    finally:
        store.close()


def _one_device_mesh():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_gs_workdir_survives_a_kill_and_resumes_evaluates_and_exports(gcs, tmp_path):
    run = f"gs://{BUCKET}/run"
    # array_record (the TFDS cache) writes local files only: the data cache stays on local disk.
    cache = f"--config.data.cache_dir={tmp_path / 'tfds'}"
    # 1. Train on gs:// until the first checkpoint is complete, then SIGKILL (a lost VM).
    proc = _run("train", *TRAIN_FLAGS, cache, "--workdir", run, env=gcs, stall=True, wait=False)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if epath.Path(run, "checkpoints").exists() and _complete_steps(run):
                break
            time.sleep(1.0)
        assert proc.poll() is None, f"the run ended early:\n{proc.communicate()[0][-4000:]}"
        assert _complete_steps(run) == [1]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # 2. Resume to completion; meanwhile nothing else runs (2 CPU cores).
    _run("train", *TRAIN_FLAGS, cache, "--workdir", run, env=gcs)
    assert _complete_steps(run)[-1] == TOTAL_STEPS
    _forget_listings()
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))  # each step once
    assert (epath.Path(run) / "run" / "tokenizer" / "tokenizer.json").exists()
    # TensorBoard writes to gs:// too (google-cloud-storage through the emulator).
    events = [p for p in (epath.Path(run) / "tensorboard").iterdir() if "tfevents" in p.name]
    assert events and any(b"actor/pg_loss" in p.read_bytes() for p in events)

    # 3. An uninterrupted local run of the same config ends with the same metrics and parameters.
    local = tmp_path / "local_run"
    _run("train", *TRAIN_FLAGS, "--workdir", local, env=gcs)
    local_records = read_metrics(local)
    for mine, ref in zip(records, local_records, strict=True):
        for key in ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "response_length/mean"):
            assert mine[key] == ref[key], (mine["step"], key)

    # 4. Evaluate straight from the gs:// workdir (its recorded tokenizer included).
    out = tmp_path / "eval"
    _run("evaluate", *TRAIN_FLAGS, cache, "--checkpoint", run, "--out", out, "--config.eval.n=1",
         "--config.eval.max_problems=2", env=gcs)
    assert "toy" in json.loads((out / "metrics.json").read_text())

    # 5. Export to gs:// and read it back with ranged reads: the resumed run's final parameters.
    export = f"gs://{BUCKET}/export"
    _run("export", "--workdir", run, "--out", export, env=gcs)
    _forget_listings()
    names = {p.name for p in epath.Path(export).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    model, cfg = models.load_pretrained(export, mesh=_one_device_mesh())
    ref_params, ref_cfg, step = checkpointing.restore_workdir_params(local, None, _one_device_mesh())
    assert step == TOTAL_STEPS and cfg.num_layers == ref_cfg.num_layers
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 model.params(), ref_params)


def test_a_cached_listing_never_hides_what_tensorstore_wrote(gcs):
    """Orbax writes arrays through TensorStore, behind gcsfs's listing cache, then asks `exists()`
    of the item folder: a resumed run that had listed `checkpoints/` failed its next save with
    "Checkpoint directory does not exist: .../checkpoints/2/accumulator"."""
    import gcsfs

    checkpointing.CheckpointStore(f"gs://{BUCKET}/listing").close()
    root = epath.Path(f"gs://{BUCKET}/listing/checkpoints")
    (root / "1" / "meta").write_text("{}")
    assert [p.name for p in root.iterdir()] == ["1"]  # a listing, as a resume makes
    writer = gcsfs.GCSFileSystem(skip_instance_cache=True)  # another writer (TensorStore's part)
    writer.pipe(f"{BUCKET}/listing/checkpoints/2/accumulator/manifest.ocdbt", b"x")
    assert (root / "2" / "accumulator").exists()
    assert sorted(p.name for p in root.iterdir()) == ["1", "2"]


def test_hf_checkpoint_on_gs_loads_with_ranged_reads_equal_to_local(gcs, tmp_path, monkeypatch):
    from tests.conftest import make_hf_model

    hf_model = make_hf_model("qwen2_mqa_tied")
    local = tmp_path / "ckpt"
    hf_model.save_pretrained(local, max_shard_size="20KB")  # several shards + an index
    remote = epath.Path(f"gs://{BUCKET}/ckpt")
    remote.mkdir(parents=True, exist_ok=True)
    for f in local.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())

    # Nothing may copy the checkpoint to local disk: every read is a byte range of one tensor.
    import fsspec
    from dapo_jax.models import safetensors_io

    reads: list[tuple[int, int]] = []
    fs = fsspec.core.url_to_fs(os.fspath(remote))[0]  # the cached instance the reader gets too
    real_cat_file = fs.cat_file

    def cat_file(path, start=None, end=None, **kw):
        if str(path).endswith(".safetensors"):
            assert start is not None and end is not None, "a whole-file read"
            reads.append((start, end))
        return real_cat_file(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", cat_file)
    monkeypatch.setattr(epath.Path, "copy", lambda *a, **k: pytest.fail("copied a checkpoint file"))
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    model, cfg = models.load_pretrained(os.fspath(remote), mesh=mesh)
    ref, ref_cfg = models.load_pretrained(local, mesh=mesh)
    assert cfg == ref_cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 model.params(), ref.params())
    total = sum(f.stat().st_size for f in local.glob("*.safetensors"))
    largest = max(end - start for start, end in reads)
    assert largest < total / 4  # byte ranges of tensors (or of their rows), never whole files
    # Each layer's tensor is fetched once for all devices: the 4 devices together read about the
    # checkpoint once (the embedding's rows twice: two devices share each vocabulary half).
    assert sum(end - start for start, end in reads) < 1.3 * total
    assert isinstance(safetensors_io.CheckpointReader(os.fspath(remote)).get(
        "model.embed_tokens.weight"), safetensors_io.RangedTensor)
