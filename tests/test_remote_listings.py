"""dapo_jax.runtime.remote_listings: object-store filesystems made after the call list afresh.

The end-to-end case (a listing cached before TensorStore wrote a checkpoint item) runs against the
GCS emulator in tests/test_gcs_emulator.py.
"""

from __future__ import annotations

import fsspec
import fsspec.config
import pytest
from etils.epath import backend

from dapo_jax.runtime.remote_listings import uncached_remote_listings


@pytest.fixture
def fresh_conf(monkeypatch):
    monkeypatch.setattr(fsspec.config, "conf", {"gcs": {"project": "p"}})
    yield fsspec.config.conf


def test_sets_the_option_keeps_others_and_is_idempotent(fresh_conf):
    uncached_remote_listings()
    assert fresh_conf["gcs"] == {"project": "p", "use_listings_cache": False}
    assert fresh_conf["gs"]["use_listings_cache"] is False
    assert fresh_conf["s3"]["use_listings_cache"] is False
    before = dict(fresh_conf)
    uncached_remote_listings()
    assert fresh_conf == before


def test_drops_the_filesystems_epath_already_made(fresh_conf, monkeypatch):
    cleared = []
    cached = type(backend.fsspec_backend)._get_filesystem
    monkeypatch.setattr(cached, "cache_clear", lambda: cleared.append(1))
    uncached_remote_listings()
    uncached_remote_listings()  # nothing changed the second time: the cache is kept
    assert cleared == [1]


def test_new_filesystems_get_the_option(fresh_conf):
    uncached_remote_listings()
    from fsspec.config import apply_config
    from gcsfs import GCSFileSystem

    assert apply_config(GCSFileSystem, {})["use_listings_cache"] is False
    assert apply_config(GCSFileSystem, {"use_listings_cache": True})["use_listings_cache"] is True
