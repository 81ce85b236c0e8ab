"""A shardserve checkpoint at any layout, read tensor by tensor or slice by slice.

tensor(name) merges the global tensor from every TP rank that holds part of it;
read_local(name, spec) reads only the rows or columns one target rank needs (safetensors
slice reads through get_slice), so a worker can serve any layout at any valid TP without an
offline reshard and without ever holding the full tensor; read_rows(name, r0, r1, out) fills
a buffer with global rows by positioned reads from the rank files (the resharder's path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..partition import ShardSpec, TPGeometry, local_shape, merge_shards, shard_spec
from ..split_table import SplitKind, split_kind
from .io import load_tokenizer
from .manifest import CheckpointError, read_manifest
from .raw_safetensors import RawSafetensors
from .reader import CheckpointSource
from .verify import verify_checkpoint


class ShardserveSource(CheckpointSource):
    """Reader for our own format, at any layout (a CheckpointSource, see reader.py)."""

    family: str
    positioned_reads = True

    def __init__(self, directory: str | os.PathLike[str], *, verify_hashes: bool = True):
        from ..models import config_from_dict, expected_tensors

        self.root = Path(directory)
        self.manifest = read_manifest(self.root)
        verify_checkpoint(self.root, self.manifest, hashes=verify_hashes)
        self.family = self.manifest.family
        where = self.root / "manifest.json"
        try:
            self.config = config_from_dict(self.family, self.manifest.config)
            expected = dict(expected_tensors(self.family, self.config))
            self.quant = None
            if self.manifest.quantization is not None:
                from ..quant.scheme import QuantConfig, stored_tensors

                self.quant = QuantConfig.from_dict(self.manifest.quantization)
                expected = {n: s for name, shape in expected.items() for n, s, _ in
                            stored_tensors(name, shape, self.dtype, self.quant)}
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: bad {self.family} config ({e})") from e
        listed = {n: tuple(e.shape) for n, e in self.manifest.tensors.items()}
        if listed != expected:
            missing = sorted(set(expected) - set(listed))[:5]
            extra = sorted(set(listed) - set(expected))[:5]
            shapes = [
                f"{n} {list(listed[n])} (config: {list(s)})"
                for n, s in expected.items()
                if n in listed and listed[n] != s
            ][:3]
            raise CheckpointError(
                f"{where}: tensors do not match the {self.family} config: missing {missing}, "
                f"unexpected {extra}, shapes {shapes}"
            )
        self.geo = TPGeometry.of(self.family, self.config)
        self._raw_files: dict[Path, RawSafetensors] = {}
        self.files = self.manifest.rank_files()
        layout = self.manifest.layout
        for t in range(layout.tp):
            for p in range(layout.pp):
                if (t, p) not in self.files:
                    raise CheckpointError(f"{self.root}: manifest lists no file for tp {t} pp {p}")
        for name, entry in self.manifest.tensors.items():
            kind = split_kind(self.family, name).value
            if entry.split != kind:
                raise CheckpointError(
                    f"{self.root / 'manifest.json'}: {name} recorded as {entry.split}, "
                    f"the split table says {kind}"
                )

    @property
    def dtype(self) -> torch.dtype:
        from .io import DTYPES

        return DTYPES[self.manifest.dtype]

    def tensor_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name` (int8 / uint8 for quantized weights)."""
        from .io import TENSOR_DTYPES

        return TENSOR_DTYPES[self.manifest.tensors[name].dtype]

    def names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, e.shape) for n, e in self.manifest.tensors.items()]

    def _spec(self, name: str, rank: int) -> ShardSpec:
        e = self.manifest.tensors[name]
        kind = SplitKind(e.split)
        return shard_spec(kind, e.shape, self.geo, self.manifest.layout.tp, rank)

    def _path(self, name: str, tp_rank: int) -> Path:
        return self.root / self.files[(tp_rank, self.manifest.tensors[name].pp_rank)]

    def _read(self, path: Path, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as f:
                if index is None:
                    return f.get_tensor(name)
                return f.get_slice(name)[index]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read {name} ({e})") from e
        except Exception as e:  # a tensor missing from the file surfaces as a generic error
            raise CheckpointError(f"{path}: cannot read {name} ({type(e).__name__}: {e})") from e

    def tensor(self, name: str) -> torch.Tensor:
        """The global tensor, merged from the rank files that hold it."""
        if name not in self.manifest.tensors:
            raise CheckpointError(f"{self.root}: no tensor {name}")
        tp = self.manifest.layout.tp
        specs = [self._spec(name, r) for r in range(tp)]
        if specs[0].dim < 0:
            return self._check(name, self._read(self._path(name, 0), name))
        shards = [self._read(self._path(name, r), name) for r in range(tp)]
        for r, (s, spec) in enumerate(zip(shards, specs, strict=True)):
            if s.shape[spec.dim] != spec.local_len:
                raise CheckpointError(
                    f"{self._path(name, r)}: {name} has {s.shape[spec.dim]} rows on dim "
                    f"{spec.dim}, layout tp={tp} needs {spec.local_len}"
                )
        return self._check(name, merge_shards(shards, specs, self.manifest.tensors[name].shape))

    def _raw(self, name: str, tp_rank: int, spec: ShardSpec) -> RawSafetensors:
        """The open rank file holding `name` for tp_rank, its entry checked against spec."""
        path = self._path(name, tp_rank)
        raw = self._raw_files.get(path)
        if raw is None:
            raw = self._raw_files[path] = RawSafetensors(path)
        e = raw.entry(name)
        want = local_shape(self.manifest.tensors[name].shape, spec)
        dtype = self.tensor_dtype(name)
        if e.shape != want or e.dtype != dtype:
            raise CheckpointError(f"{path}: {name} is {e.dtype} {list(e.shape)}, layout "
                                  f"tp={self.manifest.layout.tp} needs {dtype} {list(want)}")
        return raw

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor) -> None:
        """Fill out ([r1 - r0, *shape[1:]], contiguous, the checkpoint's dtype) with global rows
        [r0, r1) of `name`, read straight from the rank files with positioned reads: rows cut
        on dim 0 come from the ranks that hold them, columns cut on dim 1 are assembled from
        every rank's same rows. The resharder's fast path: no memory map, no merged copy."""
        specs = [self._spec(name, r) for r in range(self.manifest.layout.tp)]
        if specs[0].dim < 0:
            self._raw(name, 0, specs[0]).read_rows(name, r0, r1, out)
            return
        if specs[0].dim == 0:
            taken: set[tuple[int, int]] = set()  # replicated KV heads: the first copy wins
            for r, spec in enumerate(specs):
                offset = 0
                for a, b in spec.pieces:
                    lo, hi = max(a, r0), min(b, r1)
                    if lo < hi and (lo, hi) not in taken:
                        taken.add((lo, hi))
                        self._raw(name, r, spec).read_rows(
                            name, offset + lo - a, offset + hi - a, out[lo - r0 : hi - r0])
                    offset += b - a
            if sum(hi - lo for lo, hi in taken) != r1 - r0:
                raise CheckpointError(f"{self.root}: rank files cover {sorted(taken)} of rows "
                                      f"[{r0}, {r1}) of {name}")
            return
        for r, spec in enumerate(specs):  # dim 1: every rank holds some columns of each row
            # [rows, cols/tp, *rest] (int4 scales: [rows, groups/tp, 2])
            local = torch.empty((r1 - r0, spec.local_len, *out.shape[2:]), dtype=out.dtype)
            self._raw(name, r, spec).read_rows(name, r0, r1, local)
            offset = 0
            for a, b in spec.pieces:
                out[:, a:b].copy_(local[:, offset : offset + b - a])
                offset += b - a

    def close(self) -> None:
        for raw in self._raw_files.values():
            raw.close()
        self._raw_files.clear()

    def _check(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shape = self.manifest.tensors[name].shape
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.root}: {name} is {list(t.shape)}, manifest {list(shape)}")
        return t

    def read_local(self, name: str, target: ShardSpec) -> torch.Tensor:
        """Only the rows/columns of `target` (a ShardSpec of another TP degree), by slice reads."""
        entry = self.manifest.tensors[name]
        tp = self.manifest.layout.tp
        src_specs = [self._spec(name, r) for r in range(tp)]
        if target.dim < 0 or src_specs[0].dim < 0:
            full = (
                self.tensor(name)
                if src_specs[0].dim >= 0
                else self._read(self._path(name, 0), name)
            )
            if target.dim < 0:
                return full
            return _narrow_pieces(full, target)
        parts: list[tuple[int, torch.Tensor]] = []  # (global start, slice)
        for a, b in target.pieces:
            for r, spec in enumerate(src_specs):
                offset = 0
                for sa, sb in spec.pieces:
                    lo, hi = max(a, sa), min(b, sb)
                    if lo < hi:
                        start = offset + lo - sa
                        parts.append((lo, self._slice(r, name, spec.dim, start, start + hi - lo)))
                    offset += sb - sa
        out = [t for _, t in _dedupe(parts, target)]
        if target.pad:
            shape = list(entry.shape)
            shape[target.dim] = target.pad
            out.append(torch.zeros(shape, dtype=out[0].dtype if out else self.tensor_dtype(name)))
        return torch.cat(out, dim=target.dim) if len(out) > 1 else out[0]

    def _slice(self, rank: int, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        return self._read(self._path(name, rank), name, index)

    def tokenizer(self) -> Any:
        return load_tokenizer(self.root, self.manifest)

    def source_info(self) -> dict[str, Any]:
        layout = self.manifest.layout
        return {"format": "shardserve", "path": self.root.name, "tp": layout.tp, "pp": layout.pp}


def _narrow_pieces(full: torch.Tensor, target: ShardSpec) -> torch.Tensor:
    parts = [full.narrow(target.dim, a, b - a) for a, b in target.pieces]
    if target.pad:
        shape = list(full.shape)
        shape[target.dim] = target.pad
        parts.append(full.new_zeros(shape))
    return torch.cat(parts, dim=target.dim)


def _dedupe(parts, target: ShardSpec):
    """Keep, for each target piece in order, the slices that tile it exactly once.

    Replicated KV heads appear in several source ranks; the first copy wins.
    """
    out = []
    for a, b in target.pieces:
        pos = a
        for start, t in sorted((p for p in parts if a <= p[0] < b), key=lambda x: x[0]):
            if start != pos:
                continue  # a replica of a range already taken
            out.append((start, t))
            pos += t.shape[target.dim]
        if pos != b:
            raise CheckpointError(f"slice read covered [{a}, {pos}) of [{a}, {b})")
    return out
