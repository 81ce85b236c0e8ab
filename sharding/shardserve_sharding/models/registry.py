"""The ModelSpec of every family (see spec.py), looked up by the family name of a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convlm import CONVLM_CONFIGS, ConvLM, ConvLMConfig, ConvState
from .llama import LLAMA_CONFIGS, LlamaConfig, Transformer
from .rnnlm import RNNLM, RNNLM_CONFIGS, RecurrentState, RNNLMConfig
from .spec import CacheKind, ModelSpec, PagedKVSpec, StateSlotSpec

# ---- llama: decoder transformer over a paged KV cache


def _llama_cache(model: nn.Module) -> PagedKVSpec:
    attn = next(iter(_layers(model))).attention  # local heads after TP
    return PagedKVSpec(len(model.layers), attn.n_kv_heads, attn.head_dim)


def _llama_geometry(config: LlamaConfig) -> Any:
    from ..partition import TPGeometry

    return TPGeometry(config.n_heads, config.n_kv_heads, config.head_dim, config.vocab_size)


def _llama_stage_layers(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(h.shape[1], device=h.device)
    cos = model.rope_cos[pos][None, None].to(h.dtype)  # [1, 1, T, D]
    sin = model.rope_sin[pos][None, None].to(h.dtype)
    for blk in model.layers.values():
        h = blk(h, cos, sin, None)
    return h


def _llama_onnx(model: nn.Module, path: Path, opset: int) -> int:
    import onnx

    from ..onnx_export.llama_graph import build_llama_graph

    proto = build_llama_graph(model, opset)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return 0


def _llama_onnx_meta(model: nn.Module) -> dict[str, Any]:
    from ..onnx_export.llama_graph import GRAPH_VERSION

    a = model.layers[0].attention
    return {"n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "graph": GRAPH_VERSION}


LLAMA = ModelSpec(
    name="llama", config_cls=LlamaConfig, model_cls=Transformer, configs=LLAMA_CONFIGS,
    config_prefix="", cache_spec=_llama_cache, cache_kind=CacheKind.PAGED_KV,
    tp_geometry=_llama_geometry, onnx_export=_llama_onnx, onnx_meta=_llama_onnx_meta,
    onnx_opset=23,  # llama_graph.OPSET: Attention with grouped KV heads
    stage_layers=_llama_stage_layers, quantizable=True, plan_measurable=True,
)

# ---- convlm: gated convolutional LM over a per-sequence conv state


def _vocab_geometry(config: Any) -> Any:
    from ..partition import TPGeometry

    return TPGeometry(vocab_size=config.vocab_size)


def _convlm_cache(model: nn.Module) -> StateSlotSpec:
    cfg = model.config
    return StateSlotSpec(len(model.layers), (cfg.dim, cfg.kernel_size - 1), ConvState)


def _convlm_onnx(model: nn.Module, path: Path, opset: int) -> int:
    from ..onnx_export.export import export_torch_step
    from ..onnx_export.graphs import ConvStep

    return export_torch_step(ConvStep(model), model, _convlm_cache(model), path, opset)


def _convlm_onnx_meta(model: nn.Module) -> dict[str, Any]:
    # dim and kernel_size: what exports before state_shape was recorded gave the runtime
    return {"dim": model.config.dim, "kernel_size": model.config.kernel_size}


CONVLM = ModelSpec(
    name="convlm", config_cls=ConvLMConfig, model_cls=ConvLM, configs=CONVLM_CONFIGS,
    config_prefix="convlm-", cache_spec=_convlm_cache, cache_kind=CacheKind.STATE_SLOT,
    tp_geometry=_vocab_geometry, onnx_export=_convlm_onnx, onnx_meta=_convlm_onnx_meta,
)


# ---- rnnlm: stacked LSTM / GRU over a per-sequence recurrent state


def _rnnlm_cache(model: nn.Module) -> StateSlotSpec:
    return StateSlotSpec(len(model.layers), (model.state_width(),), RecurrentState)


def _rnnlm_stage_layers(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.run_layers(h, None)


def _rnnlm_onnx(model: nn.Module, path: Path, opset: int) -> int:
    from .rnnlm_onnx import export_rnnlm

    return export_rnnlm(model, path, opset)


RNNLM_SPEC = ModelSpec(
    name="rnnlm", config_cls=RNNLMConfig, model_cls=RNNLM, configs=RNNLM_CONFIGS,
    config_prefix="rnnlm-", cache_spec=_rnnlm_cache, cache_kind=CacheKind.STATE_SLOT,
    tp_geometry=_vocab_geometry, onnx_export=_rnnlm_onnx, onnx_meta=lambda model: {},
    stage_layers=_rnnlm_stage_layers,
)


def _layers(model: nn.Module):
    """A model's blocks, whether a ModuleList or a pipeline stage's ModuleDict."""
    layers = model.layers
    return layers.values() if isinstance(layers, nn.ModuleDict) else layers


SPECS: dict[str, ModelSpec] = {s.name: s for s in (LLAMA, CONVLM, RNNLM_SPEC)}


def model_spec(family: str) -> ModelSpec:
    """The spec of `family`; unknown families raise ValueError listing the known ones."""
    spec = SPECS.get(family)
    if spec is None:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(SPECS)}")
    return spec
