"""Read PyTorch Distributed Checkpoint (DCP) directories as torchtitan writes Llama models.

A DCP directory holds `.metadata` (a pickle: read with a restricted unpickler that resolves
only DCP's own metadata classes, see safe_pickle.py) and `*.distcp` files; each tensor is
stored as one or more chunks (global offsets and sizes), each chunk a torch.save blob read with
weights_only=True. Names are torchtitan's (`tok_embeddings`, `layers.N.attention.wq/wk/wv/wo`
or `attention.qkv_linear.wq/...`, `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`,
`norm`, `output`, optionally under a `model.` prefix). torchtitan's rotary embedding is the
interleaved (complex) one, so q and k rows are permuted into the rotate-half layout our model
uses. DCP stores shapes but not head counts or the rotary base: they come from a
params.json-style file (--config).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.manifest import CheckpointError
from ..models.llama import LlamaConfig
from .base import ImportedLlamaSource
from .gguf_reader import unpermute_rope
from .safe_pickle import load_dcp_metadata

_PARTS = {
    "attention_norm.weight": ["attention_norm.weight"],
    "ffn_norm.weight": ["ffn_norm.weight"],
    "attention.wo.weight": ["attention.wo.weight"],
    "feed_forward.w2.weight": ["feed_forward.w2.weight"],
}


def read_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (--config must name a params.json-style file)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e


class DCPSource(ImportedLlamaSource):
    """A torchtitan Llama DCP checkpoint seen as shardserve tensors, one tensor at a time."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        config: str | os.PathLike[str],
        tokenizer: Any = None,
    ) -> None:
        self.root = Path(directory)
        self.meta = load_dcp_metadata(self.root / ".metadata")
        self._tokenizer = tokenizer
        keys = list(self.meta.state_dict_metadata)
        self.prefix = "model." if any(k.startswith("model.tok_embeddings") for k in keys) else ""
        self.fused = any(".attention.qkv_linear." in k for k in keys)
        params = read_params(config)
        emb = self._shape("tok_embeddings.weight")
        w1 = self._shape("layers.0.feed_forward.w1.weight")
        n_heads = int(params["n_heads"])
        self.config = LlamaConfig(
            vocab_size=int(emb[0]),
            dim=int(params.get("dim", emb[1])),
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            intermediate_size=int(w1[0]),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            tie_embeddings=self._key("output.weight") not in self.meta.state_dict_metadata,
            max_seq_len=int(params.get("max_seq_len", 2048)),
        )
        if emb[1] != self.config.dim:
            raise CheckpointError(
                f"{config}: dim {self.config.dim} but the checkpoint's embedding is {list(emb)}"
            )
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(
                f"--tokenizer has {tokenizer.vocab_size} tokens, the "
                f"checkpoint's vocabulary {self.config.vocab_size}"
            )

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _attn_key(self, layer: int, w: str) -> str:
        mid = "attention.qkv_linear." if self.fused and w != "wo" else "attention."
        return f"layers.{layer}.{mid}{w}.weight"

    def _shape(self, name: str) -> tuple[int, ...]:
        md = self.meta.state_dict_metadata.get(self._key(name))
        if md is None:
            raise CheckpointError(f"{self.root / '.metadata'}: no tensor {self._key(name)}")
        return tuple(md.size)

    def _read(self, name: str) -> torch.Tensor:
        """Assemble a global tensor from its chunks."""
        fqn = self._key(name)
        md = self.meta.state_dict_metadata.get(fqn)
        if md is None:
            raise CheckpointError(f"{self.root / '.metadata'}: no tensor {fqn}")
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        filled = 0
        for index, info in self.meta.storage_data.items():
            if index.fqn != fqn:
                continue
            path = self.root / info.relative_path
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{path}: transformed (compressed) chunks unsupported")
            try:
                with open(path, "rb") as f:
                    f.seek(info.offset)
                    blob = f.read(info.length)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read ({e})") from e
            if len(blob) != info.length:
                raise CheckpointError(f"{path}: truncated (chunk of {fqn} ends past the file)")
            chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            view = out
            for dim, (o, n) in enumerate(zip(index.offset, chunk.shape, strict=True)):
                view = view.narrow(dim, o, n)
            view.copy_(chunk)
            filled += chunk.numel()
        if filled != out.numel():
            raise CheckpointError(
                f"{self.root}: chunks of {fqn} cover {filled} of {out.numel()} elements"
            )
        return out.float()

    def tensor(self, name: str) -> torch.Tensor:
        c = self.config
        if name in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            return self._read(name)
        layer = int(name.split(".")[1])
        rest = name.split(".", 2)[2]
        if rest in _PARTS:
            return self._read(f"layers.{layer}.{_PARTS[rest][0]}")
        if rest == "attention.wqkv.weight":
            q = unpermute_rope(self._read(self._attn_key(layer, "wq")), c.n_heads)
            k = unpermute_rope(self._read(self._attn_key(layer, "wk")), c.n_kv_heads)
            v = self._read(self._attn_key(layer, "wv"))
            return torch.cat([q, k, v])
        if rest == "feed_forward.w13.weight":
            return torch.cat(
                [
                    self._read(f"layers.{layer}.feed_forward.w1.weight"),
                    self._read(f"layers.{layer}.feed_forward.w3.weight"),
                ]
            )
        raise KeyError(name)

    def tokenizer(self) -> Any:
        return self._tokenizer

    def source_info(self) -> dict[str, Any]:
        return {"format": "dcp", "path": self.root.name}
