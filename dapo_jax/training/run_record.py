"""A self-describing workdir: what a run was, written to `<workdir>/run/` by process 0 at start.

  config.json       the resolved config (every field, FieldReferences resolved)
  config_diff.json  the fields that differ from configs/base.py's defaults: {key: {default, value}}
  git_commit        the commit of the code that ran ("unknown" outside a git checkout)
  versions.json     python, jax, jaxlib, flax, optax, orbax-checkpoint, transformers, ... versions
  sources.json      where the weights and the tokenizer came from (model.path / preset, tokenizer dir)
  tokenizer/        a copy of the tokenizer files: `evaluate --checkpoint WORKDIR` reads them
  console.log       what the entry point printed (tee'd by `tee_console`; appended on each start,
                    on gs:// one `console.<start time>.log` object per start)

A resumed run rewrites the first five with its own values (the config that is running now).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Any, TextIO

import ml_collections
from etils import epath

RUN_DIR = "run"
TOKENIZER_DIR = "tokenizer"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
            "ml_collections", "numpy", "etils", "tensorflow-datasets", "tensorstore", "gcsfs")
# What a tokenizer directory holds (HF names); everything else there (weights) is not copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def run_dir(workdir: epath.PathLike) -> epath.Path:
    """`<workdir>/run`."""
    return epath.Path(workdir) / RUN_DIR


def config_to_dict(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (references resolved, tuples as lists)."""
    return json.loads(c.to_json_best_effort())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(c: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """{dotted key: {"default": base value, "value": this config's}} for every field that differs
    from `configs/base.py` (fields the base lacks have default None)."""
    from configs.base import get_base_config

    base = _flatten(config_to_dict(get_base_config()))
    mine = _flatten(config_to_dict(c))
    return {k: {"default": base.get(k), "value": v} for k, v in sorted(mine.items())
            if k not in base or base[k] != v}


def git_commit() -> str:
    """HEAD of the checkout this package runs from, or "unknown"."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages a run's numbers depend on (absent ones omitted)."""
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def copy_tokenizer(source: epath.PathLike, dest: epath.PathLike) -> list[str]:
    """Copies the tokenizer files of `source` (local or gs://) to `dest`; returns their names."""
    source, dest = epath.Path(source), epath.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            (dest / name).write_bytes((source / name).read_bytes())
            copied.append(name)
    return copied


def write_run_record(c: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                     tokenizer_dir: str | os.PathLike) -> epath.Path:
    """Writes `<workdir>/run/` (see the module docstring); returns that folder."""
    d = run_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_to_dict(c), indent=2) + "\n")
    (d / "config_diff.json").write_text(json.dumps(config_diff(c), indent=2) + "\n")
    (d / "git_commit").write_text(git_commit() + "\n")
    (d / "versions.json").write_text(json.dumps(package_versions(), indent=2) + "\n")
    tok_dest = d / TOKENIZER_DIR
    if os.fspath(epath.Path(tokenizer_dir)) != os.fspath(tok_dest):
        copied = copy_tokenizer(tokenizer_dir, tok_dest)
    else:
        copied = sorted(p.name for p in tok_dest.iterdir())
    sources = {"model_path": c.model.path or None, "model_preset": c.model.preset or None,
               "weights": c.model.path or "random init (model.preset)",
               "tokenizer": os.fspath(tokenizer_dir), "tokenizer_copy": os.fspath(tok_dest),
               "tokenizer_files": copied}
    (d / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
    return d


def recorded_tokenizer(workdir: epath.PathLike) -> str | None:
    """The tokenizer copy of a workdir, if its run recorded one."""
    path = run_dir(workdir) / TOKENIZER_DIR
    return os.fspath(path) if (path / "tokenizer.json").exists() else None


def recorded_config(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The resolved config (`run/config.json`) a workdir's run recorded, as a dict, or None."""
    path = run_dir(workdir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def workdir_tokenizer(workdir: epath.PathLike) -> str | None:
    """Where a workdir's tokenizer is: the run record's copy, else (workdirs older than run
    records) the toy tokenizer the run built, else None."""
    toy = epath.Path(workdir) / "toy_tokenizer"
    return recorded_tokenizer(workdir) or (os.fspath(toy) if (toy / "tokenizer.json").exists()
                                           else None)


def recorded_stop_tokens(workdir: epath.PathLike) -> list[str] | None:
    """The `tokenizer.stop_tokens` the run sampled with (from its recorded config), or None."""
    c = recorded_config(workdir)
    tokens = (c or {}).get("tokenizer", {}).get("stop_tokens")
    if tokens is None:
        return None
    return [t for t in (tokens.split(",") if isinstance(tokens, str) else tokens) if t]


def wandb_settings(c: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """MetricsWriter's W&B settings from `config.logging`, or None when W&B is off."""
    lg = c.get("logging")
    if lg is None or not lg.get("wandb_project"):
        return None
    return {"project": lg.wandb_project, "entity": lg.get("wandb_entity", ""),
            "name": lg.get("wandb_name", ""), "config": config_to_dict(c)}


class _Tee:
    """A text stream that writes to the original stream and to a log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def tee_console(workdir: str | os.PathLike) -> str:
    """Copies everything printed to stdout and stderr from now on into the run's console log.

    Local workdirs: appended to `<workdir>/run/console.log`. gs:// (no append on object stores):
    written to a local file and uploaded at exit as `<workdir>/run/console.<start time>.log`.
    Returns the local log file's path. Call once per process (process 0).
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    remote = "://" in os.fspath(workdir)
    if remote:
        fd, local = tempfile.mkstemp(prefix="dapo_console_", suffix=".log")
        os.close(fd)
    else:
        os.makedirs(os.path.join(workdir, RUN_DIR), exist_ok=True)
        local = os.path.join(workdir, RUN_DIR, "console.log")
    log = open(local, "a", encoding="utf-8", buffering=1)
    log.write(f"==== {stamp} {' '.join(sys.argv)}\n")
    old = {id(sys.stdout): _Tee(sys.stdout, log), id(sys.stderr): _Tee(sys.stderr, log)}
    sys.stdout, sys.stderr = old[id(sys.stdout)], old[id(sys.stderr)]
    # Logging handlers made earlier (absl's, basicConfig's) hold the original streams: repoint them.
    for handler in logging.getLogger().handlers:
        for h in (handler, getattr(handler, "python_handler", None)):
            if isinstance(h, logging.StreamHandler) and id(h.stream) in old:
                h.setStream(old[id(h.stream)])

    def finish() -> None:
        log.flush()
        if remote:
            run_dir(workdir).mkdir(parents=True, exist_ok=True)
            (run_dir(workdir) / f"console.{stamp}.log").write_text(open(local).read())

    atexit.register(finish)
    return local
