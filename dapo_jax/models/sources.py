"""Where a `model.path` points: a local or remote HF directory, a GGUF file, or a Hugging Face Hub id.

`resolve(path)` turns any of them into a `Source` the loaders can read, so the loaders
(`load_pretrained`, `read_hf_config`, `load_tokenizer`, `evaluate --checkpoint`, `export --model`)
accept the same strings:

  /ckpt/qwen2.5-7b, gs://bucket/ckpt   HF directory (config.json + *.safetensors); remote ones are read
                                       in place (safetensors headers, then each host's byte ranges)
  /models/qwen.gguf, gs://.../x.gguf   a GGUF file (llama.cpp), read with the `gguf` library (remote
                                       ones are copied to local disk: the reader memory-maps the file)
  Qwen/Qwen2.5-7B                      a Hub repository, resolved into the Hugging Face cache
  Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q8_0.gguf   one GGUF file of a Hub repository

Hub look-ups go through `huggingface_hub` (its cache: HF_HUB_CACHE / HF_HOME); with HF_HUB_OFFLINE=1
only the cache is read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

from etils import epath

from dapo_jax.runtime.cli_errors import MissingFileError

_REMOTE = ("gs://", "s3://", "http://", "https://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the loaders read: never a repository's *.bin / *.pth / original/ copies.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


@dataclasses.dataclass(frozen=True)
class Source:
    """A readable checkpoint: `kind` is 'hf' (a directory) or 'gguf' (a file)."""

    kind: str
    local: str  # where the loaders read it: a directory (hf; local or gs://) or a local file (gguf)
    origin: str  # what the user wrote

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def is_gguf_path(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".gguf")


def _copy_remote_file(p: epath.Path) -> str:
    local = epath.Path(tempfile.mkdtemp(prefix="dapo_jax_ckpt_")) / p.name
    p.copy(local)
    return os.fspath(local)


def hub_cache_dir() -> str:
    from huggingface_hub import constants
    return os.fspath(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:  # read now, not at huggingface_hub's import
        return env.strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(repo_id: str, what: str, cause: Exception) -> MissingFileError:
    offline = _hub_offline()
    how = ("HF_HUB_OFFLINE is set, so only the cache was searched: download it once with network "
           f"(`hf download {repo_id}`) or unset HF_HUB_OFFLINE" if offline else
           "the Hub could not be reached and the cache does not hold it: download it once on a "
           f"machine with network (`hf download {repo_id}`, same HF_HOME), set HF_HUB_OFFLINE=1 to "
           "skip the network, or pass a local directory / .gguf file instead")
    return MissingFileError(
        f"model.path {what!r} looks like a Hugging Face Hub id ({repo_id}) but it is neither a local "
        f"path nor in the Hub cache at {hub_cache_dir()} (HF_HUB_OFFLINE="
        f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}): {how}. ({type(cause).__name__}: {cause})")


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                 local_files_only=_hub_offline())
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the id and cache
        raise _hub_error(repo_id, repo_id if revision is None else f"{repo_id}@{revision}", e) from e


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id, filename, revision=revision, local_files_only=_hub_offline())
    except Exception as e:  # noqa: BLE001
        raise _hub_error(repo_id, f"{repo_id}/{filename}", e) from e


def resolve(path: str | os.PathLike) -> Source:
    """The local checkpoint behind `path` (see the module docstring for what `path` may be).

    A directory that holds no config.json but exactly one .gguf file is that GGUF file.
    """
    text = os.fspath(path)
    p = epath.Path(text)
    remote = text.startswith(_REMOTE)
    if is_gguf_path(text) and p.exists():
        return Source("gguf", _copy_remote_file(p) if remote else text, text)
    if p.exists() and p.is_dir():
        if not (p / "config.json").exists():
            ggufs = [f for f in p.iterdir() if is_gguf_path(f.name)]
            if len(ggufs) == 1:
                return resolve(os.fspath(ggufs[0]))
        return Source("hf", text, text)  # remote: read in place (safetensors_io.RangedTensor)
    if not remote and not os.path.isabs(text) and not text.startswith("."):
        repo_and_rev, _, _ = text.partition("@")
        parts = repo_and_rev.split("/")
        revision = text.partition("@")[2] or None
        if len(parts) >= 3 and is_gguf_path(text):
            return Source("gguf", _hub_file("/".join(parts[:2]), "/".join(parts[2:]), revision), text)
        if _HUB_ID.match(repo_and_rev):
            return Source("hf", _hub_snapshot(repo_and_rev, revision), text)
    raise MissingFileError(
        f"model checkpoint {text!r} does not exist: give a Hugging Face checkpoint directory "
        "(config.json + *.safetensors, local or gs://), a .gguf file, or a Hub id like Qwen/Qwen2.5-7B")
