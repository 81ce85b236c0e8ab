"""Reshard any supported checkpoint to the shardserve format at a target TP x PP layout.

    shardserve reshard SRC DST --tp 3 [--pp 2] [--source-format auto] [--dtype fp32] [--verify]
        [--quantize int8|int4 [--group-size 32]]

Three stages, one module each: plan (reshard_plan.py: which tensors, their cuts and dtypes, the
quantization), write (reshard_write.py: stream each tensor's slices into the rank files, then
the manifest, renamed into place when complete; peak memory a few chunks of rows for our own
format, one tensor for the others), verify (reshard_verify.py: logits against the source).

--quantize stores the Llama linear weights (and the tied embedding / lm_head, int8) as
weight-only int8 or int4 (quant/scheme.py): each float weight is read whole, quantized, and
its integers and scales are cut by the split table like any tensor. A quantized source is
resharded as it is (its integers and scales are cut, never requantized). From a GGUF whose
linear weights are Q4_0 / Q4_1, --quantize int4 --group-size 32 takes those blocks as they
are (quant/gguf_blocks.py; the manifest's quantization.origin says "gguf:Q4_1").
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint.manifest import CheckpointError
from .checkpoint.reader import CheckpointSource
from .checkpoint.source import ShardserveSource
from .reshard_plan import plan_reshard
from .reshard_verify import verify_reshard
from .reshard_write import write_plan

SOURCE_FORMATS = ("auto", "shardserve", "hf", "gguf", "megatron", "dcp")


def open_any_source(src: str | os.PathLike[str], source_format: str = "auto", *,
                    tokenizer: Any = None, config: str | os.PathLike[str] | None = None,
                    verify_hashes: bool = True) -> CheckpointSource:
    """A reader for src: our own format at any layout, HF, GGUF, Megatron-LM or DCP.

    tokenizer: a loaded TokenizerBundle (Megatron and DCP store none); config: a params.json
    for DCP (head counts and rotary base are not in its metadata).
    """
    from .importers import detect_format, open_source

    fmt = detect_format(src) if source_format == "auto" else source_format
    if fmt == "shardserve":
        return ShardserveSource(src, verify_hashes=verify_hashes)
    return open_source(src, fmt, tokenizer=tokenizer, config=config)


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
    quantize_embedding: str = "int8-g32",
) -> ReshardReport:
    """Write src at layout (tp, pp) into dst; see the module docstring.

    tokenizer: a path (see load_tokenizer_from); config: DCP's params.json; verify_hashes:
    check a shardserve source's sha256s first (checkpoint/verify.py); quantize: "int8" or
    "int4" (group_size input columns per scale group; int8 also 0: one scale per output row;
    quantize_embedding "int8-g32", "int8" (per row) or "none").
    """
    t0 = time.perf_counter()
    given_tok = load_tokenizer_from(tokenizer) if tokenizer else None
    source = open_any_source(src, source_format, tokenizer=given_tok, config=config,
                             verify_hashes=verify_hashes)
    try:
        plan = plan_reshard(source, src, tp=tp, pp=pp, dtype=dtype, given_tokenizer=given_tok,
                            tokenizer_path=tokenizer, quantize=quantize, group_size=group_size,
                            quantize_embedding=quantize_embedding)
        write_plan(source, plan, dst, overwrite=overwrite, progress=progress)
    finally:
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


__all__ = ["SOURCE_FORMATS", "ReshardReport", "load_tokenizer_from", "open_any_source",
           "reshard", "verify_reshard"]
