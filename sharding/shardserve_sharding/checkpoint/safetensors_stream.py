"""Streaming safetensors writer: declare every tensor up front, then write them one at a time.

The safetensors layout is an 8-byte header length, a JSON header with each tensor's dtype,
shape and byte range, then the raw bytes. Declaring the specs first lets us write the header
before any data, so a resharder can free each tensor right after writing it (peak memory: one
tensor, never the whole file). The sha256 of the file is computed while writing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsStreamWriter:
    """Write tensors in declaration order into `path` (written to path + '.tmp', then renamed)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        header: dict[str, object] = {}
        offset = 0
        for s in self._specs:
            if s.dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {s.name}: dtype {s.dtype} is not supported")
            header[s.name] = {
                "dtype": _ST_DTYPES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self.size = 8 + len(raw) + offset

    def _emit(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; name, dtype and shape must match its spec."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path.name}: unexpected extra tensor {name}")
        spec = self._specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path.name}: expected {spec.name} {spec.dtype} {list(spec.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        t = tensor.detach().contiguous().cpu()
        self._emit(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        self._next += 1

    def write_parts(self, name: str, parts: list[torch.Tensor], shape: tuple[int, ...],
                    dtype: torch.dtype) -> None:
        """Write the next declared tensor given as dim-0 pieces (no concatenated copy)."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path.name}: unexpected extra tensor {name}")
        spec = self._specs[self._next]
        rows = sum(p.shape[0] for p in parts)
        if (name != spec.name or dtype != spec.dtype or tuple(shape) != spec.shape
                or rows != spec.shape[0] or any(p.dtype != dtype for p in parts)
                or any(tuple(p.shape[1:]) != spec.shape[1:] for p in parts)):
            raise ValueError(f"{self.path.name}: expected {spec.name} {spec.dtype} "
                             f"{list(spec.shape)}, got {name} {dtype} {list(shape)} as parts "
                             f"{[list(p.shape) for p in parts]}")
        for p in parts:
            t = p.detach().contiguous().cpu()
            if t.numel():
                self._emit(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> str:
        """Finish the file (all tensors must have been written); returns its sha256 hex digest."""
        if self._next != len(self._specs):
            missing = [s.name for s in self._specs[self._next :]]
            self.abort()
            raise ValueError(f"{self.path.name}: tensors never written: {missing[:5]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
