"""Import models from other formats (GGUF, Hugging Face) into the shardserve checkpoint format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.io import write_checkpoint
from ..checkpoint.manifest import CheckpointError
from ..checkpoint.reader import CheckpointSource
from ..checkpoint.safetensors_stream import TensorSpec


def detect_format(src: str | os.PathLike[str]) -> str:
    """'gguf' for a .gguf file, 'hf' for a directory with config.json, 'shardserve' for ours."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "manifest.json").is_file():
        return "shardserve"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if p.is_dir() and (p / "latest_checkpointed_iteration.txt").is_file():
        return "megatron"
    if p.is_dir() and (p / ".metadata").is_file():
        return "dcp"
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    raise CheckpointError(
        f"{p}: cannot tell the format (expected a .gguf file or a model directory)"
    )


def open_source(
    src: str | os.PathLike[str], source_format: str = "auto", *, tokenizer: Any = None,
    config: str | os.PathLike[str] | None = None,
) -> CheckpointSource:
    """The CheckpointSource (checkpoint/reader.py) for src in any format but our own.

    tokenizer (a loaded TokenizerBundle) and config (a params.json path) serve the formats
    that store neither: Megatron-LM (tokenizer) and DCP (both).
    """
    fmt = detect_format(src) if source_format == "auto" else source_format
    if fmt == "megatron":
        from .megatron import MegatronSource

        return MegatronSource(src, tokenizer=tokenizer)
    if fmt == "dcp":
        from .dcp import DCPSource

        if config is None:
            raise CheckpointError(f"{src}: a DCP checkpoint needs --config (params.json with "
                                  "n_heads, n_kv_heads, n_layers, rope_theta, norm_eps)")
        return DCPSource(src, config=config, tokenizer=tokenizer)
    if fmt == "gguf":
        from .gguf_reader import GGUFLlamaSource

        return GGUFLlamaSource(src)
    if fmt == "hf":
        from .hf_reader import HFLlamaSource

        return HFLlamaSource(src)
    raise CheckpointError(f"{src}: import from format {fmt!r} is not supported here")


def import_model(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    source_format: str = "auto",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert src into a TP=1 shardserve checkpoint at dst, one tensor in memory at a time."""
    source = open_source(src, source_format)
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"output {dst} already exists")
    tokenizer = source.tokenizer()
    shapes = source.names_and_shapes()
    specs = [TensorSpec(n, dtype, s) for n, s in shapes]

    def tensors():
        it = shapes
        if progress:
            from tqdm import tqdm

            it = tqdm(shapes, desc="import", unit="tensor")
        for name, shape in it:
            t = source.tensor(name)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(
                    f"{src}: {name} has shape {list(t.shape)}, expected {list(shape)}"
                )
            yield name, t

    return write_checkpoint(
        dst,
        family=source.family,
        config=source.config.to_dict(),
        tensors=tensors(),
        specs=specs,
        tokenizer=tokenizer,
        source=source.source_info(),
        dtype=dtype,
        overwrite=overwrite,
    )
