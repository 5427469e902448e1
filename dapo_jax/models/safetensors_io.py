"""Minimal safetensors reader/writer over numpy memmaps: lazy, sliceable, bfloat16-aware.

The `safetensors` package's numpy backend cannot represent bfloat16, and its JAX backend places
tensors on a device; for sharded loading we want host slices of any dtype without reading whole files.
The format is simple (8-byte header size, JSON header, raw little-endian data), so we read it directly.

Remote files (gs://, or any fsspec URL) are read in place with ranged reads: the header first, then
only the byte range of the rows each caller slices (`RangedTensor`), so every host of a multi-host
job fetches just the shards it owns instead of copying the whole checkpoint to local disk.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from dapo_jax.runtime.cli_errors import MissingFileError, UserError

_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_FROM_NP = {np.dtype(v): k for k, v in _TO_NP.items()}


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local file."""
    return "://" in os.fspath(path)


class RangedTensor:
    """A tensor of a remote safetensors file: slicing it reads only the rows it selects.

    Rows (the first axis) are contiguous in the file, so `t[a:b, ...]` is one ranged read of rows
    a..b; the remaining indices are applied in memory. Supports what the loaders do: basic indexing
    with slices and integers, and `np.asarray(t)` for the whole tensor.
    """

    def __init__(self, read: Callable[[int, int], bytes], start: int, dtype: Any,
                 shape: tuple[int, ...]):
        self._read, self._start = read, start
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        self.ndim = len(self.shape)
        # Row blocks read so far: devices that need the same rows (e.g. different columns of them)
        # share one read. Lives as long as this object (the loader keeps it for one layer).
        self._blocks: dict[tuple[int, int], np.ndarray] = {}

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        for (a, b), block in self._blocks.items():
            if a <= start and stop <= b:
                return block[start - a:stop - a]
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        data = self._read(self._start + start * row_bytes, self._start + stop * row_bytes)
        block = np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))
        self._blocks[(start, stop)] = block
        return block

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if not self.shape:
            return self._rows(0, 1).reshape(())[index]
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            row = int(first) + (self.shape[0] if first < 0 else 0)
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {first} out of range for shape {self.shape}")
            return self._rows(row, row + 1)[0][rest]
        if not isinstance(first, slice):  # fancy indexing: read everything
            return self._rows(0, self.shape[0])[index]
        start, stop, step = first.indices(self.shape[0])
        if step != 1:
            return self._rows(0, self.shape[0])[index]
        return self._rows(start, max(start, stop))[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class SafetensorsFile:
    """Lazy read access to one .safetensors file; tensors are memmap views (local files) or
    `RangedTensor`s (remote files), sliced on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if is_remote(self.path):
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(self.path)
            if not fs.exists(fs_path):
                raise MissingFileError(f"{self.path} does not exist: the checkpoint is incomplete; "
                                       "upload it again")
            size = int(fs.size(fs_path))
            self._read_range: Callable[[int, int], bytes] = (
                lambda start, end: fs.cat_file(fs_path, start=start, end=end))
        else:
            if not os.path.exists(self.path):
                raise MissingFileError(f"{self.path} does not exist: the checkpoint is incomplete; "
                                       "download it again")
            size = os.path.getsize(self.path)

            def read_local(start: int, end: int) -> bytes:
                with open(self.path, "rb") as f:
                    f.seek(start)
                    return f.read(end - start)

            self._read_range = read_local
        head = self._read_range(0, min(8, size))
        if len(head) < 8:
            raise self._truncated(f"{size} bytes, not even the 8-byte header size")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise UserError(f"{self.path}: header of {n} bytes is not a safetensors header: the "
                            "file is corrupt or not safetensors; download the checkpoint again")
        if 8 + n > size:
            raise self._truncated(f"{size} bytes, but its header alone needs {8 + n}")
        try:
            header = json.loads(self._read_range(8, 8 + n))
        except ValueError as e:
            raise UserError(f"{self.path}: the safetensors header is not valid JSON ({e}): the "
                            "file is corrupt; download the checkpoint again") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + n
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        if self._data_start + end > size:
            raise self._truncated(f"{size} bytes, but its tensors end at byte {self._data_start + end}")
        self._mmap = None if is_remote(self.path) else np.memmap(self.path, dtype=np.uint8, mode="r")

    def _truncated(self, detail: str) -> UserError:
        return UserError(f"{self.path} is truncated ({detail}): the download or copy stopped early; "
                         "download the checkpoint again")

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray | RangedTensor:
        """A read-only memmap view (local) or `RangedTensor` (remote) of tensor `name`: no data is
        read until it is sliced."""
        e = self._entries[name]
        if e["dtype"] not in _TO_NP:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        if self._mmap is None:
            return RangedTensor(self._read_range, self._data_start + start, _TO_NP[e["dtype"]],
                                tuple(e["shape"]))
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return raw.view(_TO_NP[e["dtype"]]).reshape(e["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` to a .safetensors file (the layout `safetensors`/`transformers` read)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _FROM_NP:
            raise ValueError(f"cannot write tensor {name} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _FROM_NP[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


class CheckpointReader:
    """All tensors of a HF checkpoint directory (single file or sharded with an index), local or
    remote (gs://: read in place with ranged reads)."""

    def __init__(self, directory: str | os.PathLike):
        from etils import epath

        directory = os.fspath(directory)
        index = os.path.join(directory, "model.safetensors.index.json")
        if epath.Path(index).exists():
            weight_map = json.loads(epath.Path(index).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in epath.Path(directory).iterdir()
                           if p.name.endswith(".safetensors"))
            if not files:
                raise MissingFileError(
                    f"No *.safetensors files in {directory}: expected a Hugging Face checkpoint "
                    "(config.json + model.safetensors or model-*.safetensors + index). Convert "
                    "PyTorch .bin checkpoints with transformers' save_pretrained(safe_serialization=True).")
            weight_map = None
        self._files = {f: SafetensorsFile(os.path.join(directory, f)) for f in files}
        self._where: dict[str, SafetensorsFile] = {}
        for fname, sf in self._files.items():
            for key in sf.keys():
                self._where[key] = sf
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._where]
            if missing:
                raise MissingFileError(f"{index} lists tensors missing from the shard files: "
                                        f"{missing[:5]}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterable[str]:
        """All tensor names."""
        return self._where.keys()

    def get(self, name: str) -> np.ndarray | RangedTensor:
        """A lazy view of tensor `name`."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in checkpoint")
        return self._where[name].get(name)
