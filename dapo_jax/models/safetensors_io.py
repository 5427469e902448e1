"""Minimal safetensors reader/writer over numpy memmaps: lazy, sliceable, bfloat16-aware.

The `safetensors` package's numpy backend cannot represent bfloat16, and its JAX backend places
tensors on a device; for sharded loading we want host slices of any dtype without reading whole files.
The format is simple (8-byte header size, JSON header, raw little-endian data), so we read it directly.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from dapo_jax.runtime.cli_errors import MissingFileError, UserError

_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_FROM_NP = {np.dtype(v): k for k, v in _TO_NP.items()}


class SafetensorsFile:
    """Lazy read access to one .safetensors file; tensors are memmap views, sliced on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise MissingFileError(f"{self.path} does not exist: the checkpoint is incomplete; "
                                   "download it again")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._truncated(f"{size} bytes, not even the 8-byte header size")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise UserError(f"{self.path}: header of {n} bytes is not a safetensors header: the "
                                "file is corrupt or not safetensors; download the checkpoint again")
            if 8 + n > size:
                raise self._truncated(f"{size} bytes, but its header alone needs {8 + n}")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise UserError(f"{self.path}: the safetensors header is not valid JSON ({e}): the "
                                "file is corrupt; download the checkpoint again") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + n
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        if self._data_start + end > size:
            raise self._truncated(f"{size} bytes, but its tensors end at byte {self._data_start + end}")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _truncated(self, detail: str) -> UserError:
        return UserError(f"{self.path} is truncated ({detail}): the download or copy stopped early; "
                         "download the checkpoint again")

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only memmap view of tensor `name` (no data is read until it is used)."""
        e = self._entries[name]
        if e["dtype"] not in _TO_NP:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
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
    """All tensors of a HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
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

    def get(self, name: str) -> np.ndarray:
        """A lazy view of tensor `name`."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in checkpoint")
        return self._where[name].get(name)
