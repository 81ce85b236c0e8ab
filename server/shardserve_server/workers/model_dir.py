"""What the front end and the leader need to know about a served model directory.

Two kinds are served: a shardserve checkpoint (manifest.json; torch shard workers) and an ONNX
export (onnx_model.json; ONNX Runtime replicas). Both carry the tokenizer under tokenizer/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServedModel:
    family: str
    config: dict[str, Any]
    backend: str
    """'torch' for a checkpoint, 'onnx' for an export."""
    tokenizer: Any
    max_seq_len: int
    manifest: Any
    """A manifest-like object with family/config (the source manifest for ONNX)."""


def describe(model_dir: str | Path) -> ServedModel:
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import CheckpointError, read_manifest
    from shardserve_sharding.tokenizer import TokenizerBundle

    root = Path(model_dir)
    if (root / "onnx_model.json").is_file():
        meta = json.loads((root / "onnx_model.json").read_text())
        tok = TokenizerBundle.load(root / "tokenizer") if (root / "tokenizer").is_dir() else None
        manifest = _ManifestLike(meta["family"], meta["config"])
        return ServedModel(meta["family"], meta["config"], "onnx", tok,
                           int(meta["config"].get("max_seq_len", 2048)), manifest)
    if not (root / "manifest.json").is_file():
        raise CheckpointError(f"{root}: neither a shardserve checkpoint (manifest.json) nor an "
                              "ONNX export (onnx_model.json)")
    manifest = read_manifest(root)
    return ServedModel(manifest.family, manifest.config, "torch", load_tokenizer(root, manifest),
                       int(manifest.config.get("max_seq_len", 2048)), manifest)


@dataclass(frozen=True)
class _ManifestLike:
    family: str
    config: dict[str, Any]
