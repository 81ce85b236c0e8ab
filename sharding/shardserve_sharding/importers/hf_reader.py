"""Read a Hugging Face Llama-style model directory (config.json + *.safetensors) tensor by tensor.

Names map from transformers' LlamaForCausalLM (`model.layers.N.self_attn.q_proj.weight`, ...)
to ours through one table (`hf_names`, which `shardserve export-hf` inverts); Q, K and V are
fused into `wqkv`, gate and up into `w13`. Only safetensors are read
(never pickled .bin files); a sharded checkpoint's index is followed, and each tensor is read
from its own file with safe_open, so memory holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint.manifest import CheckpointError
from ..models.llama import LlamaConfig
from .base import ImportedLlamaSource

HF_LLAMA_TYPES = frozenset({"llama", "mistral"})


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def hf_llama_config(cfg: dict[str, Any], path: Path) -> LlamaConfig:
    mtype = cfg.get("model_type")
    if mtype not in HF_LLAMA_TYPES:
        raise CheckpointError(
            f"{path}: model_type {mtype!r} is not supported (supported: {sorted(HF_LLAMA_TYPES)})"
        )
    if cfg.get("rope_scaling"):
        raise CheckpointError(f"{path}: rope_scaling {cfg['rope_scaling']} is not supported")
    # transformers >= 5 writes rope scaling into rope_parameters (no rope_scaling key at all).
    rope_params = cfg.get("rope_parameters") or {}
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise CheckpointError(
            f"{path}: rope_parameters {rope_params} (rope_type {rope_type!r}) is not supported; "
            "only the default rotary embedding is"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention/MLP biases are not supported")
    n_heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != int(cfg["hidden_size"]):
        raise CheckpointError(f"{path}: head_dim {head_dim} x heads != hidden_size unsupported")
    rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        dim=int(cfg["hidden_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rope_theta=float(rope),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
    )


_HF_TOP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "output.weight": ("lm_head.weight",),
}
_HF_LAYER = {  # our name after "layers.N." -> transformers' after "model.layers.N."
    "attention_norm.weight": ("input_layernorm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
    "attention.wqkv.weight": (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight",),
    "feed_forward.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight",),
}


def hf_names(name: str) -> tuple[str, ...]:
    """transformers' tensors whose concatenation on dim 0, in this order, is our `name`.

    The one name table between the two formats: the importer reads with it, export-hf
    (hf_export.py) writes with it, cutting a fused tensor by `hf_rows`.
    """
    if name in _HF_TOP:
        return _HF_TOP[name]
    layer, idx, rest = name.split(".", 2) if name.count(".") >= 2 else ("", "", "")
    if layer != "layers" or not idx.isdigit() or rest not in _HF_LAYER:
        raise KeyError(name)
    return tuple(f"model.layers.{idx}.{hf}" for hf in _HF_LAYER[rest])


def hf_rows(name: str, config: LlamaConfig) -> tuple[int, ...]:
    """Rows of each of `hf_names(name)` within our tensor (Q, K, V of wqkv; gate, up of w13)."""
    if name.endswith("attention.wqkv.weight"):
        kv = config.n_kv_heads * config.head_dim
        return (config.n_heads * config.head_dim, kv, kv)
    if name.endswith("feed_forward.w13.weight"):
        return (config.intermediate_size, config.intermediate_size)
    return ()  # one part: the whole tensor


class HFLlamaSource(ImportedLlamaSource):
    """A Hugging Face Llama directory seen as shardserve tensors, read one at a time."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.root = Path(directory)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")
        self.config = hf_llama_config(
            _read_json(self.root / "config.json"), self.root / "config.json"
        )
        self.where = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            where = {k: self.root / v for k, v in weight_map.items()}
        else:
            files = sorted(self.root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{self.root}: no *.safetensors files (pickled .bin is not read)"
                )
            where = {}
            for f in files:
                for k in self._keys(f):
                    where[k] = f
        for f in set(where.values()):
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in model.safetensors.index.json)")
        return where

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e

    def _load(self, hf_name: str) -> torch.Tensor:
        path = self.where.get(hf_name)
        if path is None:
            raise CheckpointError(f"{self.root}: tensor {hf_name} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(hf_name).float()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable tensor {hf_name} ({e})") from e

    def tensor(self, name: str) -> torch.Tensor:
        parts = [self._load(hf) for hf in hf_names(name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, _ in self.names_and_shapes():
            yield name, self.tensor(name)

    def tokenizer(self) -> Any:
        from ..tokenizer import TokenizerBundle

        if not (self.root / "tokenizer.json").is_file():
            return None
        return TokenizerBundle.from_hf_dir(self.root)

    def source_info(self) -> dict[str, Any]:
        return {"format": "hf", "path": self.root.name}
