"""Resolves dataset names from configs to prompt records (train and evaluation sets)."""

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
                                  operators=str(t.operators), template=c.data.template)


def dataset_name(spec: str) -> str:
    """A short name for metrics ("aime2024", "toy", or the file stem)."""
    if spec in KNOWN_FILES or spec == "toy":
        return spec.replace("-", "")
    return epath.Path(spec).name.split(".")[0].replace("/", "_")


def load_records(spec: str, c: ml_collections.ConfigDict, *, split: str = "train"
                 ) -> list[dp.PromptRecord]:
    """Records for `spec`: "toy", a known short name, or a parquet/JSONL file or folder path."""
    if spec == "toy":
        return dp.generate_toy_arithmetic(toy_config(c))["train" if split == "train" else "heldout"]
    path = epath.Path(spec)
    if spec in KNOWN_FILES:
        path = data_root() / KNOWN_FILES[spec]
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {spec!r}: {path} does not exist. Give a parquet/JSONL path, 'toy', or one of "
            f"{sorted(KNOWN_FILES)} (looked up in {data_root()}; set DAPO_DATA_DIR to change it)")
    kwargs: dict[str, Any] = {}
    if str(path).endswith(".jsonl"):
        kwargs["template"] = c.data.template
    records, stats = dp.load_prompt_records(path, **kwargs)
    log.info("dataset %s: %d records (%s)", spec, len(records), stats.to_dict())
    if not records:
        raise ValueError(f"dataset {spec!r} at {path} has no usable rows; see the log for skipped rows")
    return records
