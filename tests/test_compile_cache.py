"""The run's persistent compilation cache (`runtime.compile_cache`): which folder each setting
selects, and a restarted `dapo_jax.train` that loads its programs instead of compiling them."""

import os
import re
import subprocess

import jax
import pytest

from dapo_jax.runtime import compile_cache
from scripts import multihost_check as mc


@pytest.fixture
def jax_cache_dir():
    """Sets JAX's cache folder for one test (None: unset) and puts the suite's back afterwards."""
    before = jax.config.jax_compilation_cache_dir

    def set_dir(folder):
        jax.config.update("jax_compilation_cache_dir", folder)

    yield set_dir
    jax.config.update("jax_compilation_cache_dir", before)


def test_auto_is_the_workdirs_folder_unless_jax_already_has_one(jax_cache_dir, tmp_path):
    jax_cache_dir(None)
    assert compile_cache.resolve("auto", tmp_path) == str(tmp_path / "xla_cache")
    assert compile_cache.resolve("gs://bucket/cache", tmp_path) == "gs://bucket/cache"
    assert compile_cache.resolve("", tmp_path) is None
    jax_cache_dir(str(tmp_path / "mine"))  # e.g. JAX_COMPILATION_CACHE_DIR
    assert compile_cache.resolve("auto", tmp_path / "run") == str(tmp_path / "mine")
    assert compile_cache.resolve("", tmp_path / "run") == str(tmp_path / "mine")
    assert compile_cache.resolve("/elsewhere", tmp_path / "run") == "/elsewhere"
    assert compile_cache.enable("/elsewhere", tmp_path) == "/elsewhere"
    assert jax.config.jax_compilation_cache_dir == "/elsewhere"


def _run(workdir, total_steps: int) -> str:
    overrides = mc.toy_overrides({"mesh.num_devices": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
                                  "trainer.total_steps": total_steps, "trainer.save_every": 1})
    env = mc.subprocess_env(1)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the default, "auto", picks <workdir>/xla_cache
    # Every program is written, however fast it compiled (JAX's default skips those under 1 s).
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    proc = subprocess.run(mc.train_command(workdir, overrides), cwd=mc.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _counts(out: str) -> tuple[int, int]:
    m = re.search(r"XLA compilation cache: (\d+) programs loaded .*?, (\d+) written", out)
    assert m, out[-3000:]
    return int(m.group(1)), int(m.group(2))


def test_a_restarted_run_loads_its_programs_from_the_workdirs_cache(tmp_path):
    workdir = tmp_path / "run"
    loaded, first = _counts(_run(workdir, total_steps=1))
    assert loaded == 0 and first > 0
    assert len(os.listdir(workdir / "xla_cache")) >= first
    # The restart resumes from step 1 and runs step 2: the same programs, loaded (35 of 35 here;
    # a packed update of other lengths could still compile one).
    loaded, written = _counts(_run(workdir, total_steps=2))
    assert loaded > first // 2 and written < first, (loaded, written, first)
    assert [r["step"] for r in mc.read_metrics(workdir)] == [1, 2]
