"""Read row ranges of safetensors tensors straight into caller-owned buffers.

The resharder's fast path: the header is parsed once per file, the file stays open, and
`read_rows` fills a preallocated tensor with `os.preadv` (no memory map, so nothing of the
source counts towards the process's RSS after the read, and no intermediate copy). Rows are
the tensor's dim 0; a row range of a row-major tensor is one contiguous byte range.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .manifest import CheckpointError
from .safetensors_stream import _ST_DTYPES

ST_DTYPES: dict[str, torch.dtype] = {v: k for k, v in _ST_DTYPES.items()}
"""safetensors dtype names -> torch dtypes (the writer's table, reversed)."""
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor's bytes lie in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def row_bytes(self) -> int:
        item = self.dtype.itemsize
        return math.prod(self.shape[1:]) * item if self.shape else item


class RawSafetensors:
    """One open safetensors file: its parsed header and a file descriptor for positioned reads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from e
        try:
            self.tensors = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> dict[str, RawTensor]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path}: safetensors header of {n} bytes does not fit")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from e
        base = 8 + n
        out: dict[str, RawTensor] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                a, b = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: bad header entry for {name} ({err})") from err
            t = RawTensor(dtype, shape, base + a, base + b)
            expect = math.prod(shape) * dtype.itemsize
            if b - a != expect or t.end > size or a < 0:
                raise CheckpointError(
                    f"{self.path}: {name} occupies bytes [{a}, {b}) of a {size - base}-byte "
                    f"data section, its shape {list(shape)} needs {expect}"
                )
            out[name] = t
        return out

    def entry(self, name: str) -> RawTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name}") from None

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, [r1 - r0, *shape[1:]], the file's dtype) with rows [r0, r1)."""
        t = self.entry(name)
        rows = t.shape[0] if t.shape else 1
        if not 0 <= r0 <= r1 <= rows:
            raise CheckpointError(f"{self.path}: rows [{r0}, {r1}) of {name} out of {rows}")
        if out.dtype != t.dtype or not out.is_contiguous():
            raise ValueError(f"read_rows: need a contiguous {t.dtype} buffer, got {out.dtype}")
        nbytes = (r1 - r0) * t.row_bytes
        if out.numel() * out.element_size() != nbytes:
            raise ValueError(f"read_rows: buffer of {out.numel()} elements for {nbytes} bytes")
        if nbytes == 0:
            return
        view = memoryview(out.view(-1).view(torch.uint8).numpy())  # shares out's memory
        pos, done = t.begin + r0 * t.row_bytes, 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: file ended inside {name}")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
