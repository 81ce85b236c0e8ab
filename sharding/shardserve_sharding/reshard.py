"""Reshard any supported checkpoint to the shardserve format at a target TP x PP layout.

Streaming: a shardserve source is read in chunks of global rows straight from its rank files
(positioned reads, no merged copy) and each chunk's rows or columns go to the target ranks'
files (written side by side, header first, hashed on a thread each, see
safetensors_stream.py); peak memory is a few chunks. Other sources hand over one whole tensor
at a time, cut the same way. The output directory appears only when complete.

    shardserve reshard SRC DST --tp 3 [--pp 2] [--source-format auto] [--dtype fp32] [--verify]
        [--quantize int8|int4 [--group-size 32]]

--quantize stores the Llama linear weights (and the tied embedding / lm_head, int8) as
weight-only int8 or int4 (quant/scheme.py): each float weight is read whole, quantized, and
its integers and scales are cut by the split table like any tensor. A quantized source is
resharded as it is (its integers and scales are cut, never requantized). From a GGUF whose
linear weights are Q4_0 / Q4_1, --quantize int4 --group-size 32 takes those blocks as they
are (quant/gguf_blocks.py; the manifest's quantization.origin says "gguf:Q4_1").
"""

from __future__ import annotations

import dataclasses
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
from .quant.scheme import QuantConfig, quantize_weight, stored_tensors
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
    quantize: str | None = None,
    group_size: int = 32,
    quantize_embedding: str = "int8",
) -> ReshardReport:
    """Write src at layout (tp, pp) into dst; see the module docstring.

    tokenizer: a path (see load_tokenizer_from); config: DCP's params.json; verify_hashes:
    check a shardserve source's sha256s first (checkpoint/verify.py); quantize: "int8" or
    "int4" (group_size input columns per int4 group; quantize_embedding "int8" or "none").
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
    qcfg, requantize = _quant_plan(source, quantize, group_size, quantize_embedding, src)
    blocks = requantize and _gguf_blocks_apply(source, qcfg)
    if blocks:  # the GGUF's own Q4 blocks are the int4 g32 weights (quant/gguf_blocks.py)
        from .quant.gguf_blocks import gguf_block_types, gguf_int4

        qcfg = dataclasses.replace(qcfg, origin="gguf:" + "+".join(
            sorted(gguf_block_types(source))))
    stored = []  # (stored name, global shape, dtype, float source name)
    for name, shape in source.names_and_shapes():
        if requantize:
            stored += [(*t, name) for t in stored_tensors(name, tuple(shape), out_dtype, qcfg)]
        else:
            stored.append((name, tuple(shape), _stored_dtype(source, name, out_dtype), name))
    if qcfg is not None:
        from .quant.apply import check_quantized_tp

        check_quantized_tp(family, mcfg, [(t[0], t[1]) for t in stored], qcfg, tp)
    plan = []  # (stored name, global shape, dtype, stage, [spec per tp rank], float source name)
    for sname, sshape, sdtype, name in stored:
        specs = [shard_spec(split_kind(family, sname), sshape, geo, tp, r) for r in range(tp)]
        plan.append((sname, sshape, sdtype, tensor_stage(name, n_layers, pp), specs,
                     name if sname == name else None))
    file_specs: dict[tuple[int, int], list[TensorSpec]] = {
        (t, s): [] for t in range(tp) for s in range(pp)
    }
    for name, shape, sdtype, stage, specs, _ in plan:
        for t in range(tp):
            file_specs[(t, stage)].append(TensorSpec(name, sdtype, local_shape(shape, specs[t])))
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
            quantization=None if qcfg is None else qcfg.to_dict(),
        ) as b:
            writers = {k: b.open_rank_file(k[0], k[1], v) for k, v in file_specs.items()}
            it = plan
            if progress:
                from tqdm import tqdm

                it = tqdm(plan, desc=f"reshard -> tp{tp} pp{pp}", unit="tensor")
            stored: dict[str, torch.Tensor] = {}  # a quantized weight's other stored tensors
            for name, shape, sdtype, stage, specs, src_name in it:
                full = stored.pop(name, None)
                if requantize and src_name is not None and qcfg.scheme_of(src_name):
                    stored = (blocks and gguf_int4(source, src_name)) or quantize_weight(
                        src_name, source.tensor(src_name), qcfg)
                    full = stored.pop(name)
                _stream_tensor(source, name, shape, specs, [writers[(t, stage)] for t in range(tp)],
                               sdtype, full)
                b.add_tensor_entry(name, shape, stage, sdtype)
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


def _quant_plan(source: Any, quantize: str | None, group_size: int, embedding: str,
                src: Any) -> tuple[QuantConfig | None, bool]:
    """(the destination's QuantConfig or None, whether float weights are quantized here)."""
    have = getattr(source, "quant", None)
    if quantize is None:
        return have, False
    from .models import model_spec

    if not model_spec(source.family).quantizable:
        raise CheckpointError(f"{src}: --quantize supports the Llama family only; this "
                              f"checkpoint is {source.family!r}")
    want = QuantConfig(quantize, group_size if quantize == "int4" else 0, embedding)
    if have is None:
        return want, True
    if (have.scheme, have.group_size, have.embedding) != (want.scheme, want.group_size,
                                                         want.embedding):
        raise CheckpointError(
            f"{src}: already quantized ({have.scheme}, group {have.group_size}, embedding "
            f"{have.embedding}); reshard it without --quantize, or quantize a float checkpoint")
    return have, False


def _gguf_blocks_apply(source: Any, qcfg: QuantConfig) -> bool:
    """int4 g32 from a GGUF whose linear weights are all Q4_0 / Q4_1: take the blocks."""
    from .importers.gguf_reader import GGUFLlamaSource

    if not isinstance(source, GGUFLlamaSource) or (qcfg.scheme, qcfg.group_size) != ("int4", 32):
        return False
    from .quant.gguf_blocks import TYPES, gguf_block_types

    return gguf_block_types(source) <= set(TYPES)


def _stored_dtype(source: Any, name: str, out_dtype: torch.dtype) -> torch.dtype:
    """A quantized source's integers and scales keep their dtype; floats become out_dtype."""
    quant = getattr(source, "quant", None)
    if quant is not None:
        from .quant.scheme import component_of

        base, suffix = component_of(name)
        if suffix or quant.scheme_of(base):
            return source.tensor_dtype(name)
    return out_dtype


def _stream_tensor(source: Any, name: str, shape: tuple[int, ...], specs: list[ShardSpec],
                   writers: list[Any], out_dtype: torch.dtype,
                   full: torch.Tensor | None = None) -> None:
    """Write every target rank's slice of `name`, streaming global rows in chunks.

    A source that can read row ranges (our own format, at any layout) never materialises the
    tensor: each chunk of global rows is read straight from its rank files into a fresh buffer
    and each target rank's rows (dim-0 cuts, ascending pieces) or columns (dim-1 cuts) of it go
    to that rank's file. Other sources hand over the whole tensor (or the caller does: `full`,
    a tensor quantized here); it is cut the same way.
    """
    rows = shape[0] if shape else 1
    inner = tuple(shape[1:])
    if not all(s.dim != 0 or _ascending(s.pieces) for s in specs):  # the split table's promise
        raise ValueError(f"{name}: a rank's dim-0 pieces are not in ascending order")
    if full is None and not hasattr(source, "read_rows"):
        full = source.tensor(name)
    if full is not None:
        if tuple(full.shape) != shape:
            raise CheckpointError(f"{name} is {list(full.shape)}, expected {list(shape)}")
        full = full.to(out_dtype).reshape(rows, *inner)  # [rows, *inner]
    for w in writers:
        w.begin(name, out_dtype)
    src_dtype = (full.dtype if full is not None else source.tensor_dtype(name)
                 if hasattr(source, "tensor_dtype") else source.dtype)
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
    same random tokens; raises CheckpointError unless max|a-b| <= tolerance * max|ref|. A
    quantized dst is compared with itself served at TP=1 (its integers and scales are the
    source's by construction; tests/sharding/test_quant.py checks that)."""
    from .checkpoint.manifest import read_manifest
    from .models import build_model
    from .sharded_load import load_sharded_model
    from .tp.comm import run_ranks

    if read_manifest(dst).quantization is not None:
        return _verify_quantized(dst, tolerance, seed)
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


def _verify_quantized(dst: str | os.PathLike[str], tolerance: float, seed: int) -> float:
    """Logits of a quantized dst at its own TP (threads) against dst at TP=1 (fp32)."""
    from .checkpoint.manifest import read_manifest
    from .sharded_load import load_sharded_model
    from .tp.comm import ThreadGroup, run_ranks

    m = read_manifest(dst)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, int(m.config["vocab_size"]), (2, 16), generator=gen)
    positions = torch.arange(16).expand(2, 16)

    def run(comm, rank):
        model = load_sharded_model(dst, comm, dtype=torch.float32)
        with torch.no_grad():
            return model(tokens, positions)

    ref = run(ThreadGroup(1).comm(0), 0)
    out = run_ranks(m.layout.tp, run)[0]
    err = float((out - ref).abs().max() / ref.abs().max())
    if not err <= tolerance:
        raise CheckpointError(f"{dst}: verification failed, TP={m.layout.tp} logits differ from "
                              f"TP=1 by {err:.3g} (relative), tolerance {tolerance:g}")
    return err
