"""Reshard any supported checkpoint to the shardserve format at a target TP x PP layout.

Streaming: a shardserve source is read in chunks of global rows straight from its rank files
(positioned reads, no merged copy) and each chunk's rows or columns go to the target ranks'
files (written side by side, header first, hashed on a thread each, see
safetensors_stream.py); peak memory is a few chunks. Other sources hand over one whole tensor
at a time, cut the same way. The output directory appears only when complete.

    shardserve reshard SRC DST --tp 3 [--pp 2] [--source-format auto] [--dtype fp32] [--verify]
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint.io import DTYPES, CheckpointBuilder
from .checkpoint.manifest import CheckpointError, Layout
from .checkpoint.safetensors_stream import TensorSpec
from .checkpoint.source import ShardserveSource
from .partition import (
    ShardSpec,
    TPGeometry,
    check_tp,
    local_shape,
    shard_spec,
    stage_layers,
    tensor_stage,
)
from .split_table import split_kind

SOURCE_FORMATS = ("auto", "shardserve", "hf", "gguf", "megatron", "dcp")


def open_any_source(src: str | os.PathLike[str], source_format: str = "auto", *,
                    tokenizer: Any = None, config: str | os.PathLike[str] | None = None,
                    verify_hashes: bool = True) -> Any:
    """A reader for src: our own format at any layout, HF, GGUF, Megatron-LM or DCP.

    tokenizer: a loaded TokenizerBundle (Megatron and DCP store none); config: a params.json
    for DCP (head counts and rotary base are not in its metadata).
    """
    from .importers import detect_format, open_source

    fmt = detect_format(src) if source_format == "auto" else source_format
    if fmt == "shardserve":
        return ShardserveSource(src, verify_hashes=verify_hashes)
    source = open_source(src, fmt, tokenizer=tokenizer, config=config)
    source.family = "llama"
    return source


def load_tokenizer_from(path: str | os.PathLike[str]) -> Any:
    """--tokenizer: a .gguf file, a tokenizer.json, a HF directory or a shardserve tokenizer dir."""
    from .tokenizer import TokenizerBundle, load_gguf_tokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf_tokenizer(p)
    if p.is_file() and p.name == "tokenizer.json":
        p = p.parent
    if p.is_dir() and (p / "manifest.json").is_file():
        p = p / "tokenizer"
    if not p.is_dir():
        raise CheckpointError(f"{path}: not a tokenizer (a .gguf, tokenizer.json or directory)")
    if (p / "tokenizer_config.json").is_file():
        try:
            return TokenizerBundle.load(p)
        except (ValueError, KeyError):
            pass
    return TokenizerBundle.from_hf_dir(p)


@dataclass(frozen=True)
class ReshardReport:
    dst: Path
    seconds: float
    bytes_written: int
    verify_error: float | None = None


def reshard(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    tp: int,
    pp: int = 1,
    source_format: str = "auto",
    tokenizer: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    verify: bool = False,
    progress: bool = False,
    overwrite: bool = False,
    config: str | os.PathLike[str] | None = None,
    verify_hashes: bool = True,
) -> ReshardReport:
    """Write src at layout (tp, pp) into dst; see the module docstring.

    tokenizer: a path (see load_tokenizer_from); config: DCP's params.json; verify_hashes:
    check a shardserve source's sha256s first (checkpoint/verify.py).
    """
    t0 = time.perf_counter()
    given_tok = load_tokenizer_from(tokenizer) if tokenizer else None
    source = open_any_source(src, source_format, tokenizer=given_tok, config=config,
                             verify_hashes=verify_hashes)
    family, mcfg = source.family, source.config
    check_tp(family, mcfg, tp)
    n_layers = mcfg.n_layers
    stage_layers(n_layers, pp)  # validates pp
    out_dtype = (
        DTYPES[{"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)]
        if dtype
        else (getattr(source, "dtype", torch.float32))
    )
    # our own format's tokenizer files are copied as they are (checked when first written)
    tok_dir = None
    if given_tok is None and isinstance(source, ShardserveSource) and source.manifest.tokenizer:
        tok_dir = source.root / source.manifest.tokenizer
    tok = given_tok if given_tok is not None or tok_dir else source.tokenizer()
    if tok is not None and tok.vocab_size > mcfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer or src}: tokenizer has {tok.vocab_size} tokens but the model's "
            f"vocabulary has {mcfg.vocab_size} rows"
        )
    geo = TPGeometry.of(family, mcfg)
    names = source.names_and_shapes()
    plan = []  # (name, global shape, stage, [spec per tp rank])
    for name, shape in names:
        kind = split_kind(family, name)
        specs = [shard_spec(kind, shape, geo, tp, r) for r in range(tp)]
        plan.append((name, tuple(shape), tensor_stage(name, n_layers, pp), specs))
    file_specs: dict[tuple[int, int], list[TensorSpec]] = {
        (t, s): [] for t in range(tp) for s in range(pp)
    }
    for name, shape, stage, specs in plan:
        for t in range(tp):
            file_specs[(t, stage)].append(TensorSpec(name, out_dtype, local_shape(shape, specs[t])))
    info = {**source.source_info(), "resharded_by": "shardserve reshard"}
    try:
        with CheckpointBuilder(
            dst,
            family=family,
            config=mcfg.to_dict(),
            layout=Layout(tp, pp),
            dtype=out_dtype,
            source=info,
            overwrite=overwrite,
        ) as b:
            writers = {k: b.open_rank_file(k[0], k[1], v) for k, v in file_specs.items()}
            it = plan
            if progress:
                from tqdm import tqdm

                it = tqdm(plan, desc=f"reshard -> tp{tp} pp{pp}", unit="tensor")
            for name, shape, stage, specs in it:
                _stream_tensor(source, name, shape, specs, [writers[(t, stage)] for t in range(tp)],
                               out_dtype)
                b.add_tensor_entry(name, shape, stage)
            for (t, s), w in writers.items():
                b.close_rank_file(w, t, s)
            if tok_dir is not None:
                b.copy_tokenizer(tok_dir)
            elif tok is not None:
                b.save_tokenizer(tok)
    finally:
        if hasattr(source, "close"):
            source.close()
    written = sum(p.stat().st_size for p in Path(dst).rglob("*") if p.is_file())
    err = None
    if verify:
        try:
            err = verify_reshard(src, dst, source_format=source_format, tokenizer=given_tok,
                                 config=config)
        except BaseException:
            shutil.rmtree(dst, ignore_errors=True)  # never leave an unverified result behind
            raise
    return ReshardReport(Path(dst), time.perf_counter() - t0, written, err)


CHUNK_BYTES = 4 << 20
"""Rows are streamed in chunks of about this many bytes (per chunk: one positioned read, a
write per target rank, hashing on the writers' threads)."""


def _ascending(pieces: tuple[tuple[int, int], ...]) -> bool:
    return all(a[1] <= b[0] for a, b in zip(pieces, pieces[1:], strict=False))


def _stream_tensor(source: Any, name: str, shape: tuple[int, ...], specs: list[ShardSpec],
                   writers: list[Any], out_dtype: torch.dtype) -> None:
    """Write every target rank's slice of `name`, streaming global rows in chunks.

    A source that can read row ranges (our own format, at any layout) never materialises the
    tensor: each chunk of global rows is read straight from its rank files into a fresh buffer
    and each target rank's rows (dim-0 cuts, ascending pieces) or columns (dim-1 cuts) of it go
    to that rank's file. Other sources hand over the whole tensor; it is cut the same way.
    """
    rows = shape[0] if shape else 1
    inner = tuple(shape[1:])
    if not all(s.dim != 0 or _ascending(s.pieces) for s in specs):  # the split table's promise
        raise ValueError(f"{name}: a rank's dim-0 pieces are not in ascending order")
    full = None
    if not hasattr(source, "read_rows"):
        full = source.tensor(name)
        if tuple(full.shape) != shape:
            raise CheckpointError(f"{name} is {list(full.shape)}, expected {list(shape)}")
        full = full.to(out_dtype).reshape(rows, *inner)  # [rows, *inner]
    for w in writers:
        w.begin(name, out_dtype)
    item = (full.dtype if full is not None else source.dtype).itemsize
    step = max(1, CHUNK_BYTES // max(1, math.prod(inner) * item))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if full is not None:
            buf = full[r0:r1]  # [r1 - r0, *inner], a view
        else:
            buf = torch.empty((r1 - r0, *inner), dtype=source.dtype)  # [r1 - r0, *inner]
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


def verify_reshard(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    source_format: str = "auto",
    tolerance: float = 1e-5,
    seed: int = 0,
    tokenizer: Any = None,
    config: str | os.PathLike[str] | None = None,
) -> float:
    """Logits of src (merged, one process) and dst (its own TP, simulated with threads) on the
    same random tokens; raises CheckpointError unless max|a-b| <= tolerance * max|ref|."""
    from .models import build_model
    from .sharded_load import load_sharded_model
    from .tp.comm import run_ranks

    source = open_any_source(src, source_format, tokenizer=tokenizer, config=config)
    torch.manual_seed(seed)
    with torch.device("meta"):
        ref_model = build_model(source.family, source.config)
    state = {n: source.tensor(n).float() for n, _ in source.names_and_shapes()}
    ref_model = ref_model.to_empty(device="cpu")
    ref_model.load_state_dict(state, strict=False, assign=True)
    if getattr(source.config, "tie_embeddings", False):
        ref_model.output.weight = ref_model.tok_embeddings.weight
    if hasattr(ref_model, "reset_buffers"):
        ref_model.reset_buffers()
    del state
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, source.config.vocab_size, (2, 16), generator=gen)
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        ref = ref_model.eval()(tokens, positions)
    del ref_model
    from .checkpoint.manifest import read_manifest

    tp = read_manifest(dst).layout.tp

    def run(comm, rank):
        model = load_sharded_model(dst, comm, dtype=torch.float32)
        with torch.no_grad():
            return model(tokens, positions)

    out = run_ranks(tp, run)[0]
    err = float((out - ref).abs().max() / ref.abs().max())
    if not err <= tolerance:
        raise CheckpointError(
            f"{dst}: verification failed, logits differ from {src} by {err:.3g} (relative), "
            f"tolerance {tolerance:g}"
        )
    return err
