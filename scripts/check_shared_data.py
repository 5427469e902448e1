"""Checks that ../shared/data holds the real data files the tests read.

    python3 scripts/check_shared_data.py [DATA_DIR]

`.ci/run` calls it before `make test`, so a CI run without the data stops with one message that
says what is missing and where it belongs, instead of silently skipping every real-data test.
tests/conftest.py uses the same list for its `shared_data` fixture. Standard library only: it
runs before the virtual environment exists.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real public data is never copied into the repository: it sits in a `shared` folder beside it.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# Path inside the data folder -> what it is and which tests read it.
REQUIRED_FILES = {
    "dapo-math-17k.parquet": "DAPO-Math-17k, the DAPO training set (test_data_sources, "
                             "test_data_rendering)",
    "aime-2024.parquet": "AIME 2024 as shipped by the DAPO authors, 30 problems x 32 copies "
                         "(test_data_sources, test_data_tfds)",
    "aime2024.jsonl": "AIME 2024, one row per problem (test_evaluate, test_eval_report, "
                      "test_data_sources, test_data_tfds, test_data_rendering)",
    "aime2025.jsonl": "AIME 2025 I and II (test_data_sources)",
    "math500.jsonl": "MATH-500 (test_data_sources)",
    "tokenizers/qwen2.5/tokenizer.json": "the Qwen2.5 tokenizer (test_tokenizer, test_evaluate, "
                                         "test_data_rendering)",
    "tokenizers/qwen2.5/tokenizer_config.json": "the Qwen2.5 tokenizer's config and chat template "
                                                "(same tests)",
}


def missing_files(data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> list[str]:
    """The REQUIRED_FILES absent from `data_dir` (all of them when the folder itself is absent)."""
    root = pathlib.Path(data_dir)
    return [name for name in REQUIRED_FILES if not (root / name).is_file()]


def problem(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, one_line: bool = False
            ) -> str | None:
    """A message for people saying what is missing, where and why; None when everything is there.

    `one_line`: a short form (for a pytest skip reason) that points at this script for the rest.
    """
    root = pathlib.Path(data_dir).resolve()
    missing = missing_files(root)
    if not missing:
        return None
    where = (f"the folder {root} does not exist" if not root.is_dir() else
             f"{len(missing)} of the {len(REQUIRED_FILES)} files the tests read are not in {root}")
    if one_line:
        what = (f"{root} does not exist (the project's `shared` folder belongs beside the "
                f"repository)" if not root.is_dir() else f"{root} lacks {', '.join(missing)}")
        return (f"real test data is missing: {what}; `python3 scripts/check_shared_data.py` lists "
                f"the files, what they are for and how to provide them")
    listing = "\n".join(f"  - {name}: {REQUIRED_FILES[name]}" for name in missing)
    return (f"real test data is missing: {where}.\n{listing}\n"
            f"These are real public data files (datasets and the Qwen2.5 tokenizer) that tests read "
            f"from `../shared/data` relative to the repository root ({REPO_ROOT}); they are never "
            f"copied into the repository. Fix: put the project's `shared` folder beside the "
            f"repository so that {root} holds the files above (shared/data/README.md describes "
            f"each file, its schema and source).")


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the problem and returns 1 when files are missing; 0 (and a one-line OK) otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = pathlib.Path(argv[0]) if argv else DEFAULT_DATA_DIR
    message = problem(data_dir)
    if message:
        print(f"ERROR: {message}", file=sys.stderr)
        return 1
    print(f"real test data: all {len(REQUIRED_FILES)} files present in {data_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
