"""What one rank of a layout holds and computes, read from the split table (no rule re-derived).

For a model (family + config) and a layout (TP x PP), every stored tensor's split kind comes
from split_table.split_kind, its slice on a rank from partition.shard_spec, its pipeline stage
from partition.tensor_stage; from those this module sums, per rank:
- weight elements (the dtype's bytes per element are applied by the caller),
- matmul elements (2-D weights that multiply activations: every weight but the embedding
  lookup; a tied output projection counts on the last stage), i.e. FLOPs/token / 2,
- the collectives of one forward: one all-reduce of [tokens, dim] per rowwise tensor and per
  vocab-split embedding, one all-gather of [rows, vocab/tp] for a vocab-split output.
The KV cache per token per rank follows the family's cache kind (registry/spec.py) and
partition.kv_heads_per_rank (KV heads replicated where TP exceeds them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shardserve_sharding.models import CacheKind, expected_tensors, model_spec
from shardserve_sharding.partition import (
    TPGeometry,
    kv_heads_per_rank,
    local_shape,
    padded_vocab,
    shard_spec,
    stage_layers,
    tensor_stage,
)
from shardserve_sharding.split_table import SplitKind, split_kind

DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
"""Bytes per weight element; int8 is ONNX's dynamic quantization (activations stay fp32)."""
ACT_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 2.0, "int8": 4.0}
"""Bytes per activation / KV element for a weight dtype (fp8 weights keep bf16 activations)."""


@dataclass(frozen=True)
class StageFootprint:
    """One pipeline stage on its most loaded TP rank (ranks differ only by vocab padding)."""

    weight_elems: int
    """Elements this rank stores."""
    matmul_elems: int
    """Elements of this rank's weights that multiply each token (FLOPs per token / 2)."""
    n_layers: int
    """Transformer/conv layers of the stage."""
    allreduces: int
    """All-reduces of [tokens, dim] per forward (0 at TP 1)."""
    gathers_vocab: int
    """Elements per sampled row all-gathered for the output logits (0 at TP 1 or not last)."""
    head_elems: int = 0
    """Of matmul_elems, the output projection's: it multiplies only the rows that sample
    (the model takes logits_index), not every prompt token."""


@dataclass(frozen=True)
class Footprint:
    """A model cut at TP x PP: per-stage rank footprints and the cache geometry per rank."""

    family: str
    tp: int
    pp: int
    dim: int
    stages: tuple[StageFootprint, ...]
    cache_kind: CacheKind
    kv_elems_per_token: int
    """K and V elements per token per rank of the stage with the most layers (paged KV)."""
    state_elems_per_seq: int
    """Per-sequence state elements per rank (state-slot families)."""
    attn_heads: int
    """Query heads per rank (attention FLOPs per cached token: 4 * heads * head_dim)."""
    head_dim: int
    params: int
    """Parameters of the whole model (a tied matrix once)."""


def footprint(family: str, config: Any, tp: int, pp: int) -> Footprint:
    """Per-rank sizes of `config` cut at tp x pp; ValueError (from the split rules) if it
    cannot be cut that way."""
    spec = model_spec(family)
    geo = TPGeometry.of(family, config)
    n_layers = int(config.n_layers)
    layer_ranges = stage_layers(n_layers, pp)  # ValueError when pp > layers
    tied = bool(getattr(config, "tie_embeddings", False))
    weights = [0] * pp
    matmul = [0] * pp
    allreduces = [0] * pp
    gathers = [0] * pp
    head = [0] * pp
    params = 0
    dim = int(config.dim)
    for name, shape in expected_tensors(family, config):
        kind = split_kind(family, name)
        worst = max(math.prod(local_shape(shape, shard_spec(kind, shape, geo, tp, r)))
                    for r in range(tp))  # raises with the split rule's reason
        params += math.prod(shape)
        stage = tensor_stage(name, n_layers, pp)
        weights[stage] += worst
        is_embedding = name.startswith("tok_embeddings.")
        if len(shape) == 2 and not is_embedding:
            matmul[stage] += worst
        if tp > 1 and kind is SplitKind.ROWWISE:
            allreduces[stage] += 1
        if is_embedding and kind is SplitKind.VOCAB and tp > 1:
            allreduces[stage] += 1  # masked lookup, summed over ranks
        if name.startswith("output.") and len(shape) == 2:
            head[stage] += worst
        if name.startswith("output.") and kind is SplitKind.VOCAB and tp > 1:
            gathers[stage] += padded_vocab(shape[0], tp)
        if is_embedding and tied:  # the output projection of the last stage
            matmul[pp - 1] += worst
            head[pp - 1] += worst
            if pp > 1:
                weights[pp - 1] += worst  # the last stage keeps its own copy
            if tp > 1:
                gathers[pp - 1] += padded_vocab(shape[0], tp)
    stages = tuple(StageFootprint(weights[s], matmul[s], len(layer_ranges[s]), allreduces[s],
                                  gathers[s], head[s]) for s in range(pp))
    kv, state, heads, head_dim = 0, 0, 0, 0
    most_layers = max(len(r) for r in layer_ranges)
    if spec.cache_kind is CacheKind.PAGED_KV:
        head_dim = geo.head_dim
        heads = geo.n_heads // tp
        kv = 2 * most_layers * kv_heads_per_rank(geo.n_kv_heads, tp) * head_dim
    else:  # the full model's state shape, its channels cut by tp like the split conv weights
        import torch

        with torch.device("meta"):
            cache = spec.cache_spec(spec.build(config))
        state = most_layers * math.prod(cache.state_shape) // tp
    return Footprint(family, tp, pp, dim, stages, spec.cache_kind, kv, state, heads, head_dim,
                     params)
