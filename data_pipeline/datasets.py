"""Resolves dataset names from configs to prompt records (train and evaluation sets), read through
the TFDS array_record cache."""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
from etils import epath

import data_pipeline as dp

log = logging.getLogger(__name__)

# Short names for the evaluation sets shipped in ../shared/data (or DAPO_DATA_DIR).
KNOWN_FILES = {
    "aime2024": "aime2024.jsonl",
    "aime-2024": "aime-2024.parquet",
    "aime2025": "aime2025.jsonl",
    "math500": "math500.jsonl",
    "dapo-math-17k": "dapo-math-17k.parquet",
}
DEFAULT_SCORER = {"math500": "math_verify"}  # non-integer answers need symbolic equivalence
# Short names with their own TFDS builder; other files are cached by the generic PromptFile builder.
NAMED_BUILDERS = {"dapo-math-17k": dp.DapoMath17k, "aime-2024": dp.Aime2024}


def data_root() -> epath.Path:
    """Folder of the named datasets: $DAPO_DATA_DIR, else ../shared/data next to the repository."""
    env = os.environ.get("DAPO_DATA_DIR")
    if env:
        return epath.Path(env)
    return epath.Path(__file__).resolve().parents[2] / "shared" / "data"


def toy_config(c: ml_collections.ConfigDict) -> dp.ToyArithmeticConfig:
    """The toy arithmetic generator settings from config.data.toy."""
    t = c.data.toy
    return dp.ToyArithmeticConfig(seed=c.seed, num_train=t.num_train, num_heldout=t.num_heldout,
                                  min_operands=t.min_operands, max_operands=t.max_operands,
                                  min_digits=t.min_digits, max_digits=t.max_digits,
                                  operators=str(t.operators), template=c.data.template,
                                  kinds=str(t.get("kinds", "")))


def dataset_name(spec: str) -> str:
    """A short name for metrics ("aime2024", "toy", or the file stem)."""
    if spec in KNOWN_FILES or spec == "toy":
        return spec.replace("-", "")
    return epath.Path(spec).name.split(".")[0].replace("/", "_")


# Where the cache goes when the workdir is on object storage (array_record writes local files only).
LOCAL_CACHE = "~/.cache/dapo_jax/tfds"


def _remote(path: epath.PathLike) -> bool:
    return "://" in str(path)


def cache_dir(c: ml_collections.ConfigDict, default_parent: epath.PathLike) -> epath.Path:
    """The TFDS array_record cache folder: `data.cache_dir`, else `<default_parent>/tfds`, or, when
    `default_parent` is on object storage (a gs:// workdir), the local LOCAL_CACHE, which every host
    builds for itself (`cache_is_shared`)."""
    configured = c.data.get("cache_dir")
    if configured:
        return epath.Path(configured)
    if _remote(default_parent):
        return epath.Path(os.path.expanduser(LOCAL_CACHE))
    return epath.Path(default_parent) / "tfds"


def cache_is_shared(c: ml_collections.ConfigDict, default_parent: epath.PathLike) -> bool:
    """Whether `cache_dir` is storage every host sees (built once by process 0): a configured
    data.cache_dir or a local workdir's; False for the per-host local cache of a gs:// workdir."""
    return bool(c.data.get("cache_dir")) or not _remote(default_parent)


def tfds_source(spec: str, c: ml_collections.ConfigDict, *, split: str = "train"
                ) -> tuple[str, str, dict[str, Any]]:
    """(builder name, TFDS split, builder arguments) for `spec`: "toy", a known short name, or a
    parquet/JSONL file or folder path. `split` is "train" or "val"; it only picks the toy split."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; use 'train' or 'val'")
    if spec == "toy":
        return (dp.ToyArithmetic.name, "train" if split == "train" else "heldout",
                {"toy_config": toy_config(c)})
    path = epath.Path(spec)
    if spec in KNOWN_FILES:
        path = data_root() / KNOWN_FILES[spec]
    if not path.exists():
        raise dp.DataFileNotFound(
            f"dataset {spec!r}: {path} does not exist. Give a parquet/JSONL path, 'toy', or one of "
            f"{sorted(KNOWN_FILES)} (looked up in {data_root()}; set DAPO_DATA_DIR to change it)")
    builder = NAMED_BUILDERS.get(spec, dp.PromptFile)
    return builder.name, builder.SPLIT, {"source_path": path, "template": c.data.template}


def load_records(spec: str, c: ml_collections.ConfigDict, *, split: str = "train",
                 cache_dir: epath.PathLike, shared: bool = True) -> dp.RecordDataSource:
    """Records for `spec` (see `tfds_source`), read through the TFDS array_record cache in `cache_dir`.

    The first call builds `<cache_dir>/<name>/<config>/<version>/` from the source; later calls
    (later runs, resumes) reuse it. With several JAX processes, process 0 builds while the others
    wait at a barrier, then every process reads the same files; so every process must call this,
    in the same order, and `cache_dir` must be storage they all share. With `shared=False` (a
    per-host local cache, `cache_is_shared`) every process builds its own copy instead. The records
    come back in source order, equal to what the parquet/JSONL readers or the toy generator produce.
    """
    import jax  # deferred: resolving names and readers needs no JAX backend
    from jax.experimental import multihost_utils

    name, tfds_split, kwargs = tfds_source(spec, c, split=split)
    build_error: Exception | None = None
    if jax.process_index() == 0 or not shared:
        try:
            dp.build_tfds_dataset(name, data_dir=cache_dir, **kwargs)
        except Exception as e:  # meet the others at the barrier first, so they stop instead of waiting
            build_error = e
    if jax.process_count() > 1 and shared:
        # Hosts that see different source bytes get different cache names: the barrier's name check
        # then fails on every host instead of one host reading a cache built from another file.
        variant = "/".join(dp.tfds_cache_dir(name, data_dir=cache_dir, **kwargs).parts[-3:])
        multihost_utils.sync_global_devices(f"data_pipeline: TFDS cache {variant}")
    if build_error is not None:
        raise build_error
    records = dp.load_tfds_records(name, tfds_split, data_dir=cache_dir, build=False, **kwargs)
    log.info("dataset %s: %d records from %s", spec, len(records), cache_dir)
    return records
