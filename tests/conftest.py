"""Test-session setup: 8 fake CPU devices so sharded tests run anywhere."""
import os

# Must happen before jax is imported anywhere: tests see 8 CPU devices; single-device
# tests place arrays on jax.devices()[0] or build a 1-device mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to ../shared/data; skips the test with a reason when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_data: pathlib.Path) -> pathlib.Path:
    """The real Qwen2.5 tokenizer folder from ../shared/data."""
    path = shared_data / "tokenizers" / "qwen2.5"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"Qwen2.5 tokenizer not found at {path}")
    return path
