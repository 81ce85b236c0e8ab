"""Where each rank's slice of a tensor lives in the global tensor, for every split kind.

A rank's local tensor is a concatenation, along one dimension, of ranges of the global tensor,
followed by zero rows (vocabulary padding only). That one description (ShardSpec) drives
splitting (shard_tensor), merging (merge_shards), slice reads from a checkpoint at another
layout, and the tensor-parallel layers' local shapes. The kinds themselves come from
split_table.py; this module only knows their geometry.

    fused_qkv with H=9 query heads, Hkv=3 KV heads, head_dim D, tp=3, rank 1:
      rows [3D, 6D) of q, then KV head 1 of k (rows 9D + [D, 2D)) and of v (rows 12D + [D, 2D))
    tp=6 with Hkv=3: each KV head is held by two ranks (replicated, as vLLM does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .split_table import SplitKind, split_kind


@dataclass(frozen=True)
class ShardSpec:
    """One rank's slice: `pieces` (global [start, stop) ranges along `dim`) then `pad` zeros."""

    dim: int
    """The dimension that is cut (-1 for a replicated tensor)."""
    pieces: tuple[tuple[int, int], ...]
    """Global ranges, concatenated in order, that make up the local tensor."""
    pad: int = 0
    """Zero rows appended after the pieces (vocabulary padding)."""

    @property
    def local_len(self) -> int:
        return sum(b - a for a, b in self.pieces) + self.pad


@dataclass(frozen=True)
class TPGeometry:
    """The per-model numbers that the split kinds need."""

    n_heads: int = 1
    n_kv_heads: int = 1
    head_dim: int = 1
    vocab_size: int = 1

    @classmethod
    def of(cls, family: str, config: Any) -> TPGeometry:
        """The family's numbers for `config` (its ModelSpec's tp_geometry)."""
        from .models import model_spec

        return model_spec(family).tp_geometry(config)


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Vocabulary rows after padding to a multiple of tp."""
    return -(-vocab_size // tp) * tp


def kv_heads_per_rank(n_kv_heads: int, tp: int) -> int:
    return max(1, n_kv_heads // tp)


def _even(n: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    if n % tp:
        raise ValueError(f"{what} {n} is not divisible by tp {tp}")
    step = n // tp
    return rank * step, (rank + 1) * step


def shard_spec(
    kind: SplitKind, shape: Sequence[int], geo: TPGeometry, tp: int, rank: int
) -> ShardSpec:
    """The slice of a tensor of global `shape` that TP rank `rank` of `tp` holds."""
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} out of range for tp {tp}")
    if kind is SplitKind.REPLICATED or tp == 1 and kind is not SplitKind.VOCAB:
        return ShardSpec(-1, ((0, shape[0] if shape else 1),))
    if kind is SplitKind.COLWISE:
        return ShardSpec(0, (_even(shape[0], tp, rank, "output features"),))
    if kind is SplitKind.ROWWISE:
        return ShardSpec(1, (_even(shape[1], tp, rank, "input features"),))
    if kind is SplitKind.VOCAB:
        v = shape[0]
        per = padded_vocab(v, tp) // tp
        start, stop = rank * per, (rank + 1) * per
        real = (min(start, v), min(stop, v))
        return ShardSpec(0, (real,) if real[1] > real[0] else (), pad=per - (real[1] - real[0]))
    if kind is SplitKind.FUSED_HALVES:
        half = shape[0] // 2
        a, b = _even(half, tp, rank, "each fused half")
        return ShardSpec(0, ((a, b), (half + a, half + b)))
    if kind is SplitKind.FUSED_QKV:
        h, hkv, d = geo.n_heads, geo.n_kv_heads, geo.head_dim
        if shape[0] != (h + 2 * hkv) * d:
            raise ValueError(f"fused qkv has {shape[0]} rows, expected (H + 2 Hkv) D")
        qa, qb = _even(h, tp, rank, "query heads")
        if tp <= hkv:
            ka, kb = _even(hkv, tp, rank, "KV heads")
        else:
            if tp % hkv:
                raise ValueError(f"tp {tp} is neither a divisor nor a multiple of KV heads {hkv}")
            ka = rank // (tp // hkv)
            kb = ka + 1
        k0, v0 = h * d, (h + hkv) * d
        return ShardSpec(
            0, ((qa * d, qb * d), (k0 + ka * d, k0 + kb * d), (v0 + ka * d, v0 + kb * d))
        )
    raise ValueError(f"unknown split kind {kind}")


def local_shape(shape: Sequence[int], spec: ShardSpec) -> tuple[int, ...]:
    if spec.dim < 0:
        return tuple(shape)
    out = list(shape)
    out[spec.dim] = spec.local_len
    return tuple(out)


def shard_tensor(t: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The local slice of global tensor t (a new contiguous tensor; views are not kept)."""
    if spec.dim < 0:
        return t.clone()
    parts = [t.narrow(spec.dim, a, b - a) for a, b in spec.pieces]
    if spec.pad:
        shape = list(t.shape)
        shape[spec.dim] = spec.pad
        parts.append(t.new_zeros(shape))
    return torch.cat(parts, dim=spec.dim) if len(parts) > 1 else parts[0].contiguous().clone()


def merge_shards(
    shards: Sequence[torch.Tensor], specs: Sequence[ShardSpec], shape: Sequence[int]
) -> torch.Tensor:
    """Rebuild the global tensor from every rank's local slice (replicas must agree)."""
    if specs[0].dim < 0:
        return shards[0].clone()
    out = shards[0].new_empty(tuple(shape))
    for local, spec in zip(shards, specs, strict=True):
        offset = 0
        for a, b in spec.pieces:
            out.narrow(spec.dim, a, b - a).copy_(local.narrow(spec.dim, offset, b - a))
            offset += b - a
    return out


def valid_tps(family: str, config: Any, limit: int = 64) -> list[int]:
    """Every TP degree up to `limit` that can cut this model."""
    tensors = _split_tensors(family, config)  # built once: a model on "meta" is not free
    return [tp for tp in range(1, limit + 1) if _tp_error(family, config, tp, tensors) is None]


def _split_tensors(family: str, config: Any) -> list[tuple[SplitKind, tuple[int, ...]]]:
    """(kind, shape) of every stored tensor, one entry per distinct pair."""
    from .models import expected_tensors

    seen: dict[tuple[SplitKind, tuple[int, ...]], None] = {}
    for name, shape in expected_tensors(family, config):
        seen[(split_kind(family, name), tuple(shape))] = None
    return list(seen)


def _tp_error(
    family: str,
    config: Any,
    tp: int,
    tensors: list[tuple[SplitKind, tuple[int, ...]]] | None = None,
) -> str | None:
    geo = TPGeometry.of(family, config)
    try:
        for kind, shape in tensors if tensors is not None else _split_tensors(family, config):
            shard_spec(kind, shape, geo, tp, 0)
    except ValueError as e:
        return str(e)
    return None


def check_tp(family: str, config: Any, tp: int) -> None:
    """Raise a ValueError naming the numbers and the valid TPs when tp cannot cut the model."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    err = _tp_error(family, config, tp)
    if err is not None:
        heads = f"{config.n_heads} query heads, " if hasattr(config, "n_heads") else ""
        raise ValueError(
            f"tp {tp} cannot split this {family} model ({heads}{err}); "
            f"valid tp values: {valid_tps(family, config)}"
        )


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of the pp pipeline stages (earlier stages take the remainder)."""
    if not 1 <= pp <= n_layers:
        raise ValueError(f"pp {pp} must be between 1 and the number of layers {n_layers}")
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def tensor_stage(name: str, n_layers: int, pp: int) -> int:
    """Pipeline stage that stores `name`: embeddings on the first, norm/output on the last."""
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        for s, r in enumerate(stage_layers(n_layers, pp)):
            if layer in r:
                return s
        raise ValueError(f"{name}: layer {layer} out of range for {n_layers} layers")
    if name.startswith("tok_embeddings."):
        return 0
    return pp - 1
