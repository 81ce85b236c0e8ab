"""Read llama.cpp GGUF files as shardserve Llama tensors, one tensor at a time.

GGUF stores tensors in llama.cpp's names and, for Q and K, with llama.cpp's rotary row
permutation (its converter interleaves the two rotary halves of every head); we undo that
permutation so the weights match the Hugging Face "rotate half" layout our model uses. Quantised
tensors are dequantised to fp32 with the gguf package, for an explicit list of types.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.manifest import CheckpointError
from ..models.llama import LlamaConfig
from .base import ImportedLlamaSource

try:
    import gguf
    from gguf import GGMLQuantizationType as Q
except ImportError as e:  # pragma: no cover - gguf is a hard dependency
    raise ImportError("reading GGUF files needs the `gguf` package") from e

SUPPORTED_TYPES = frozenset(
    {
        Q.F32,
        Q.F16,
        Q.BF16,
        Q.Q8_0,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q4_K,
        Q.Q5_K,
        Q.Q6_K,
    }
)
LLAMA_ARCHS = frozenset({"llama", "mistral"})


class GGUFError(CheckpointError):
    """A GGUF file cannot be imported; the message names the file and the reason."""


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """Open and sanity-check a GGUF file (present, complete, every tensor inside the file)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise GGUFError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated (tensor {t.name} ends past the end of the file)")
    return reader


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def llama_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in LLAMA_ARCHS:
        raise GGUFError(
            f"{path}: model architecture {arch!r} is not supported (supported: "
            f"{sorted(LLAMA_ARCHS)})"
        )

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
        return v

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} unsupported")
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    return LlamaConfig(
        vocab_size=int(meta.get(f"{arch}.vocab_size", vocab or 0)) or int(vocab or 0),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        intermediate_size=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
        max_seq_len=int(get("context_length", 2048)),
    )


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: w [H*D, in] interleaved -> rotate-half layout."""
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    return (
        w.reshape(n_heads, half, 2, *w.shape[1:])  # [H, D/2, 2, in]
        .transpose(1, 2)  # [H, 2, D/2, in]
        .reshape(w.shape)
    )


class GGUFLlamaSource(ImportedLlamaSource):
    """A GGUF file seen as shardserve Llama tensors (global, fp32), read one at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.meta = metadata(self.reader)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.config = llama_config(self.meta, set(self._tensors), self.path)
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise GGUFError(
                    f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which shardserve"
                    f" does not dequantize (supported: {sorted(q.name for q in SUPPORTED_TYPES)})"
                )

    def _load(self, gname: str) -> torch.Tensor:
        t = self._tensors.get(gname)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {gname} is missing")
        data = t.data
        if t.tensor_type in (Q.F32, Q.F16):
            arr = np.asarray(data, dtype=np.float32)
        else:
            arr = gguf.quants.dequantize(np.asarray(data), t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 first
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))

    def tensor(self, name: str) -> torch.Tensor:
        """One shardserve tensor by name, built from the GGUF tensors it comes from."""
        c = self.config
        if name == "tok_embeddings.weight":
            return self._load("token_embd.weight")
        if name == "norm.weight":
            return self._load("output_norm.weight")
        if name == "output.weight":
            return self._load("output.weight")
        _, idx, rest = name.split(".", 2)
        b = f"blk.{idx}."
        simple = {
            "attention_norm.weight": "attn_norm.weight",
            "ffn_norm.weight": "ffn_norm.weight",
            "attention.wo.weight": "attn_output.weight",
            "feed_forward.w2.weight": "ffn_down.weight",
        }
        if rest in simple:
            return self._load(b + simple[rest])
        if rest == "attention.wqkv.weight":
            q = unpermute_rope(self._load(b + "attn_q.weight"), c.n_heads)
            k = unpermute_rope(self._load(b + "attn_k.weight"), c.n_kv_heads)
            return torch.cat([q, k, self._load(b + "attn_v.weight")], dim=0)
        if rest == "feed_forward.w13.weight":
            return torch.cat([self._load(b + "ffn_gate.weight"), self._load(b + "ffn_up.weight")])
        raise KeyError(name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, _ in self.names_and_shapes():
            yield name, self.tensor(name)

    def tokenizer(self) -> Any:
        from ..tokenizer import tokenizer_from_gguf_fields

        return tokenizer_from_gguf_fields(self.meta)

    def source_info(self) -> dict[str, Any]:
        types = sorted({t.tensor_type.name for t in self.reader.tensors})
        return {
            "format": "gguf",
            "path": self.path.name,
            "tensor_types": types,
            "name": self.meta.get("general.name"),
        }
