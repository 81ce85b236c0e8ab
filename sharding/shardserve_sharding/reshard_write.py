"""Stage 2 of `shardserve reshard`: carry a ReshardPlan out into the destination directory.

A source with positioned reads (our own format, at any layout) is read in chunks of global rows
straight from its rank files and each chunk's rows or columns go to the target ranks' files
(written side by side, header first, hashed on a thread each, see safetensors_stream.py); peak
memory is a few chunks. Other sources hand over one whole tensor at a time, cut the same way.
CheckpointBuilder writes the manifest and tokenizer and renames the finished directory into
place: the output appears only when complete.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .checkpoint.io import CheckpointBuilder
from .checkpoint.manifest import CheckpointError
from .checkpoint.reader import CheckpointSource
from .partition import ShardSpec
from .quant.scheme import quantize_weight
from .reshard_plan import ReshardPlan

CHUNK_BYTES = 4 << 20
"""Rows are streamed in chunks of about this many bytes (per chunk: one positioned read, a
write per target rank, hashing on the writers' threads)."""


def write_plan(source: CheckpointSource, plan: ReshardPlan, dst: str | os.PathLike[str], *,
               overwrite: bool = False, progress: bool = False) -> None:
    """Write every planned tensor's slices, the manifest and the tokenizer into dst (atomic:
    built aside, renamed into place by CheckpointBuilder)."""
    tp, pp = plan.layout.tp, plan.layout.pp
    qcfg = plan.quant
    with CheckpointBuilder(
        dst,
        family=plan.family,
        config=plan.config.to_dict(),
        layout=plan.layout,
        dtype=plan.dtype,
        source={**source.source_info(), "resharded_by": "shardserve reshard"},
        overwrite=overwrite,
        quantization=None if qcfg is None else qcfg.to_dict(),
    ) as b:
        writers = {k: b.open_rank_file(k[0], k[1], v) for k, v in plan.file_specs().items()}
        it: Any = plan.tensors
        if progress:
            from tqdm import tqdm

            it = tqdm(plan.tensors, desc=f"reshard -> tp{tp} pp{pp}", unit="tensor")
        pending: dict[str, torch.Tensor] = {}  # a quantized weight's other stored tensors
        for p in it:
            full = pending.pop(p.name, None)
            if plan.requantize and p.float_source is not None and qcfg.scheme_of(p.float_source):
                pending = _quantized(source, plan, p.float_source)
                full = pending.pop(p.name)
            stream_tensor(source, p.name, p.shape, list(p.specs),
                          [writers[(t, p.stage)] for t in range(tp)], p.dtype, full)
            b.add_tensor_entry(p.name, p.shape, p.stage, p.dtype)
        for (t, s), w in writers.items():
            b.close_rank_file(w, t, s)
        if plan.tokenizer_dir is not None:
            b.copy_tokenizer(plan.tokenizer_dir)
        elif plan.tokenizer is not None:
            b.save_tokenizer(plan.tokenizer)


def _quantized(source: CheckpointSource, plan: ReshardPlan, name: str) -> dict[str, torch.Tensor]:
    """The stored tensors (integers, scales) of float weight `name`, quantized here or taken
    from the GGUF's own Q4 blocks."""
    if plan.gguf_blocks:
        from .quant.gguf_blocks import gguf_int4

        blocks = gguf_int4(source, name)
        if blocks:
            return blocks
    return quantize_weight(name, source.tensor(name), plan.quant)


def _ascending(pieces: tuple[tuple[int, int], ...]) -> bool:
    return all(a[1] <= b[0] for a, b in zip(pieces, pieces[1:], strict=False))


def stream_tensor(source: CheckpointSource, name: str, shape: tuple[int, ...],
                  specs: list[ShardSpec], writers: list[Any], out_dtype: torch.dtype,
                  full: torch.Tensor | None = None) -> None:
    """Write every target rank's slice of `name`, streaming global rows in chunks.

    A source with positioned reads (our own format, at any layout) never materialises the
    tensor: each chunk of global rows is read straight from its rank files into a fresh buffer
    and each target rank's rows (dim-0 cuts, ascending pieces) or columns (dim-1 cuts) of it go
    to that rank's file. Other sources hand over the whole tensor (or the caller does: `full`,
    a tensor quantized here); it is cut the same way.
    """
    rows = shape[0] if shape else 1
    inner = tuple(shape[1:])
    if not all(s.dim != 0 or _ascending(s.pieces) for s in specs):  # the split table's promise
        raise ValueError(f"{name}: a rank's dim-0 pieces are not in ascending order")
    if full is None and not source.positioned_reads:
        full = source.tensor(name)
    if full is not None:
        if tuple(full.shape) != shape:
            raise CheckpointError(f"{name} is {list(full.shape)}, expected {list(shape)}")
        full = full.to(out_dtype).reshape(rows, *inner)  # [rows, *inner]
    for w in writers:
        w.begin(name, out_dtype)
    src_dtype = full.dtype if full is not None else source.tensor_dtype(name)
    item = src_dtype.itemsize
    step = max(1, CHUNK_BYTES // max(1, math.prod(inner) * item))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if full is not None:
            buf = full[r0:r1]  # [r1 - r0, *inner], a view
        else:
            buf = torch.empty((r1 - r0, *inner), dtype=src_dtype)  # [r1 - r0, *inner]
            source.read_rows(name, r0, r1, buf)
            buf = buf.to(out_dtype)
        for w, spec in zip(writers, specs, strict=True):
            if spec.dim < 0:
                w.append(buf, owned=True)
            elif spec.dim == 0:
                for a, b in spec.pieces:
                    lo, hi = max(a, r0), min(b, r1)
                    if lo < hi:
                        w.append(buf[lo - r0 : hi - r0], owned=True)
            else:  # columns of every row: a small contiguous copy per chunk
                cols = [buf[:, a:b] for a, b in spec.pieces]
                w.append(torch.cat(cols, 1) if len(cols) > 1 else cols[0].contiguous(),
                         owned=True)
    for w, spec in zip(writers, specs, strict=True):
        if spec.pad:  # vocabulary padding rows at the end of the rank's slice
            w.append(torch.zeros((spec.pad, *inner), dtype=out_dtype), owned=True)
