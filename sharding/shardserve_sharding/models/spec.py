"""What a model family declares to the rest of shardserve: one frozen ModelSpec per family.

Everything outside models/ that used to ask `family == "llama"` asks the family's spec
instead (after torchtitan's ModelSpec and vLLM v1's kv_cache_interface): the config and model
classes and named configs, the TP geometry the split kinds need, the cache the scheduler
reserves and the workers allocate, the full-sequence layer loop of a pipeline stage, and the
ONNX step-graph builder. Adding a family means a model file, a spec in registry.py and rules
in split_table.py.

Two cache kinds (the cache contract of base.py behind both):
- PagedKVSpec: per-token K/V in fixed-size blocks; the scheduler counts blocks (and may share
  prefix blocks), a step carries block tables, and FLAT plans (all of a step's tokens in one
  row) are possible.
- StateSlotSpec: a fixed-size per-sequence state (conv window, recurrent h/c); the scheduler
  hands out one slot per running sequence, a step carries slot ids, and the model advances
  the rows' states through its state class (`from_tensor`, `.state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CacheKind(str, Enum):
    """How the scheduler accounts a family's decoding state."""

    PAGED_KV = "paged_kv"
    """Tokens of K/V in blocks: memory grows with the sequence; prefix blocks can be shared."""
    STATE_SLOT = "state_slot"
    """One fixed-size slot per sequence, whatever its length."""


@dataclass(frozen=True)
class PagedKVSpec:
    """Geometry of a paged KV cache on one rank (after TP: local KV heads)."""

    n_layers: int
    """Layers holding K/V."""
    n_kv_heads: int
    """KV heads on this rank."""
    head_dim: int
    """Width of one head."""
    kind: CacheKind = CacheKind.PAGED_KV


@dataclass(frozen=True)
class StateSlotSpec:
    """Geometry of a per-sequence state pool on one rank: [n_layers, slots, *state_shape]."""

    n_layers: int
    """Layers holding state."""
    state_shape: tuple[int, ...]
    """One layer's state of one sequence on this rank (local widths after TP)."""
    state_cls: Any
    """The model's DecodeCache over a state tensor [L, B, *state_shape]: `from_tensor(t)`
    wraps rows gathered from the pool, `.state` is the advanced tensor to scatter back, and
    the model's forward takes it as its cache. Zeros are the state before any token."""
    kind: CacheKind = CacheKind.STATE_SLOT


CacheSpec = PagedKVSpec | StateSlotSpec


def plain_stage_layers(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The layers of a pipeline stage over whole sequences, no cache: h [B, T, dim] -> same."""
    for blk in model.layers.values():
        h = blk(h, None)
    return h


@dataclass(frozen=True)
class ModelSpec:
    """One model family: how to build, cut, cache, train and export it."""

    name: str
    """Family name, as manifest.json stores it."""
    config_cls: type
    """Frozen config dataclass (`from_dict`, `to_dict`)."""
    model_cls: type[nn.Module]
    """The plain torch module (no torch.distributed), built from a config."""
    configs: Mapping[str, Any]
    """Named configs (a tiny one for tests); the vocabulary is set at train time."""
    config_prefix: str
    """Prefix of the named configs in the flat NAMED_CONFIGS table ("" for llama)."""
    cache_spec: Callable[[nn.Module], CacheSpec]
    """The cache geometry of a built (possibly TP-cut) model; its `kind` is cache_kind."""
    cache_kind: CacheKind
    """What the scheduler reserves and allocates per sequence."""
    tp_geometry: Callable[[Any], Any]
    """config -> partition.TPGeometry (the numbers the split kinds need)."""
    onnx_export: Callable[[nn.Module, Path, int], int]
    """Write the step graph to path (+ external data); returns tied initializers merged."""
    onnx_meta: Callable[[nn.Module], dict[str, Any]]
    """Family-specific fields of onnx_model.json (the state shape, a graph version)."""
    onnx_opset: int = 17
    """Default opset of the exported step graph."""
    stage_layers: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(
        default=plain_stage_layers)
    """A pipeline stage's layers over whole sequences (training): h [B, T, dim] -> same."""
    quantizable: bool = False
    """Weight-only int8 / int4 (`quant/`) knows this family's linear layers."""
    plan_measurable: bool = False
    """`shardserve plan --measure` knows this family's layer GEMM shapes."""

    def build(self, config: Any) -> nn.Module:
        """The randomly initialised model for `config`."""
        return self.model_cls(config)

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        return self.config_cls.from_dict(d)

    def named_config(self, name: str) -> Any:
        """A named config; unknown names raise ValueError listing the known ones."""
        if name not in self.configs:
            raise ValueError(f"unknown {self.name} config {name!r}; known: {sorted(self.configs)}")
        return self.configs[name]
