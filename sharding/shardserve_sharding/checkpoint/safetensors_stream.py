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
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        return math.prod(self.shape) * self.dtype.itemsize


class _Hasher:
    """sha256 of a byte stream, computed on a thread of its own (hashlib releases the GIL on
    large buffers, so hashing overlaps the next read and write). Buffers are kept alive until
    hashed; the queue is bounded, so at most `depth` chunks wait."""

    def __init__(self, depth: int = 8) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._q.get()
            try:
                if data is None:
                    return
                if callable(data):  # a side job, run in stream order (see after())
                    data()
                elif self._error is None:
                    self._hash.update(data)
            except BaseException as e:  # reported by digest()
                self._error = e
            finally:
                self._q.task_done()

    def update(self, data: memoryview | bytes) -> None:
        self._q.put(data)

    def after(self, job: Callable[[], object]) -> None:
        """Run job on the hasher's thread once everything queued before it is hashed."""
        self._q.put(job)

    def wait(self) -> None:
        """Return once everything queued is hashed (the caller may then reuse its buffers)."""
        self._q.join()

    def digest(self) -> str:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._q.put(None)
            self._thread.join()


_WRITEBACK_BYTES = 32 << 20
_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (shares its memory)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsStreamWriter:
    """Write tensors in declaration order into `path` (written to path + '.tmp', then renamed).

    Whole tensors go through write(); a resharder that never holds a whole tensor streams one
    with begin(name) and append(chunk) (each chunk: whole rows, or any contiguous run of
    elements in row-major order), and the byte count is checked against the declared shape.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._pending: TensorSpec | None = None  # the tensor being appended to
        self._left = 0  # its bytes not yet written
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
        self._f = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in close()/abort()
        self._hash = _Hasher()
        self._written = 0  # bytes written so far
        self._flushed = 0  # bytes whose writeback has been started
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self.size = 8 + len(raw) + offset

    def _emit(self, data: bytes | memoryview, owned: bool = False) -> None:
        """Write data and hash it (on the hasher's thread, overlapping the write). Unless the
        buffer is `owned` (never to be changed by the caller), wait for its hash to finish."""
        self._hash.update(data)
        view = memoryview(data)
        done = 0
        while done < len(view):  # a raw write may be short
            done += self._f.write(view[done:])
        self._written += done
        if self._written - self._flushed >= _WRITEBACK_BYTES:
            self._start_writeback()
        if not owned:
            self._hash.wait()

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing the bytes written so far to disk, without waiting
        (POSIX_FADV_DONTNEED starts writeback of dirty pages; pages still dirty stay cached),
        so that the fsync at close() waits only for the tail."""
        if _FADV_DONTNEED is not None:  # on the hasher's thread: the call may take a while
            fd, off, n = self._f.fileno(), self._flushed, self._written - self._flushed
            self._hash.after(lambda: os.posix_fadvise(fd, off, n, _FADV_DONTNEED))
        self._flushed = self._written

    def _take(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None) -> TensorSpec:
        if self._pending is not None:
            raise ValueError(f"{self.path.name}: {self._pending.name} is not finished "
                             f"({self._left} bytes missing)")
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path.name}: unexpected extra tensor {name}")
        spec = self._specs[self._next]
        if name != spec.name or dtype != spec.dtype or (shape is not None and shape != spec.shape):
            raise ValueError(
                f"{self.path.name}: expected {spec.name} {spec.dtype} {list(spec.shape)}, "
                f"got {name} {dtype} {list(shape) if shape is not None else ''}"
            )
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; name, dtype and shape must match its spec."""
        self._take(name, tensor.dtype, tuple(tensor.shape))
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._emit(_bytes_of(t))
        self._next += 1

    def begin(self, name: str, dtype: torch.dtype) -> None:
        """Start streaming the next declared tensor; append() its data, in order."""
        spec = self._take(name, dtype, None)
        self._pending, self._left = spec, spec.nbytes
        if self._left == 0:
            self._finish_pending()

    def append(self, chunk: torch.Tensor, *, owned: bool = False) -> None:
        """Write the next elements of the tensor begun (row-major order). owned=True: the
        caller hands the chunk over and never changes it, so it may still be being hashed when
        append returns."""
        spec = self._pending
        if spec is None:
            raise ValueError(f"{self.path.name}: append() without begin()")
        if chunk.dtype != spec.dtype:
            raise ValueError(f"{self.path.name}: {spec.name} is {spec.dtype}, got {chunk.dtype}")
        t = chunk.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if n > self._left:
            raise ValueError(f"{self.path.name}: {spec.name} {list(spec.shape)} overflows by "
                             f"{n - self._left} bytes")
        if n:
            self._emit(_bytes_of(t), owned)
        self._left -= n
        if self._left == 0:
            self._finish_pending()

    def _finish_pending(self) -> None:
        self._pending = None
        self._next += 1

    def close(self) -> str:
        """Finish the file (all tensors must have been written); returns its sha256 hex digest."""
        if self._pending is not None or self._next != len(self._specs):
            missing = [s.name for s in self._specs[self._next :]]
            self.abort()
            raise ValueError(f"{self.path.name}: tensors never written (or unfinished): "
                             f"{missing[:5]}")
        digest = self._hash.digest()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return digest

    def abort(self) -> None:
        self._hash.stop()
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
