"""Pack the working tree into a .tar.gz for copying to TPU workers.

`python -m launch.pack --src . --out /tmp/src.tar.gz` takes the files git knows about or would
track (tracked + untracked, minus .gitignore'd), so uncommitted edits travel but virtualenvs,
checkpoints and caches do not. Outside a git checkout it walks the tree instead, skipping the
same well-known folders.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tarfile
from typing import Sequence

# Never shipped, even when a checkout forgot to .gitignore them: each worker builds its own venv,
# and run outputs belong in the (gs://) workdir.
EXCLUDED_DIRS = frozenset({".git", ".venv", "venv", "workdir", "__pycache__", ".pytest_cache",
                           ".hypothesis", ".mypy_cache"})


def _excluded(relative: str) -> bool:
    return any(part in EXCLUDED_DIRS for part in pathlib.PurePosixPath(relative).parts[:-1])


def _git_files(src: pathlib.Path) -> list[str] | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # git missing or not a checkout: fall back to walking the tree
    return [name for name in result.stdout.decode().split("\0") if name]


def _walked_files(src: pathlib.Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        files += [pathlib.Path(root, n).relative_to(src).as_posix() for n in names]
    return files


def list_files(src: pathlib.Path, exclude: Sequence[pathlib.Path] = ()) -> list[str]:
    """Sorted POSIX paths (relative to `src`) of the files to ship."""
    candidates = _git_files(src)
    if candidates is None:
        candidates = _walked_files(src)
    skip = {p.resolve() for p in exclude}
    return sorted(
        name for name in set(candidates)
        if not _excluded(name)
        # git still lists tracked files deleted in the working tree.
        and (src / name).is_file()
        and (src / name).resolve() not in skip)


def write_tarball(src: pathlib.Path, out: pathlib.Path) -> int:
    """Write `out` with the files of `src` and return how many it holds."""
    files = list_files(src, exclude=[out])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for name in files:
            tar.add(src / name, arcname=name, recursive=False)
    return len(files)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: pack --src into --out."""
    parser = argparse.ArgumentParser(prog="python -m launch.pack", description=__doc__)
    parser.add_argument("--src", default=".", help="folder to pack (default: current folder)")
    parser.add_argument("--out", required=True, help="the .tar.gz to write")
    args = parser.parse_args(argv)
    src, out = pathlib.Path(args.src), pathlib.Path(args.out)
    if not src.is_dir():
        print(f"error: --src {src} is not a folder", file=sys.stderr)
        return 2
    count = write_tarball(src, out)
    print(f"packed {count} files from {src.resolve()} into {out} "
          f"({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
