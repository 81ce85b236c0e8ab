"""Model families: plain torch modules, their frozen configs and their ModelSpecs (spec.py),
looked up by family name."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from .convlm import CONVLM_CONFIGS, ConvLM, ConvLMConfig
from .llama import LLAMA_CONFIGS, LlamaConfig, Transformer
from .registry import SPECS, model_spec
from .spec import CacheKind, ModelSpec, PagedKVSpec, StateSlotSpec

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    name: (s.config_cls, s.model_cls) for name, s in SPECS.items()
}

NAMED_CONFIGS: dict[str, tuple[str, Any]] = {
    f"{s.config_prefix}{name}": (s.name, cfg) for s in SPECS.values()
    for name, cfg in s.configs.items()
}


def config_from_dict(family: str, d: dict[str, Any]) -> Any:
    """Build the frozen config of `family` from a manifest's config dict."""
    return model_spec(family).config_from_dict(d)


def build_model(family: str, config: Any) -> nn.Module:
    """Instantiate (randomly initialised) the model of `family` for `config`."""
    return model_spec(family).build(config)


def checkpoint_names(model: nn.Module) -> list[str]:
    """Parameter names a checkpoint stores: a tied output weight is stored once (the embedding)."""
    names = []
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        names.append(name)
    return names


def expected_tensors(family: str, config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of this model stores, in checkpoint order."""
    try:
        return list(_expected_tensors(family, config))
    except TypeError:  # an unhashable config: not cached
        return list(_expected_tensors.__wrapped__(family, config))


@functools.lru_cache(maxsize=32)
def _expected_tensors(family: str, config: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torch

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_model(family, config)
    params = dict(model.named_parameters())
    return tuple((n, tuple(params[n].shape)) for n in checkpoint_names(model))


__all__ = [
    "CONVLM_CONFIGS",
    "FAMILIES",
    "LLAMA_CONFIGS",
    "NAMED_CONFIGS",
    "SPECS",
    "CacheKind",
    "ModelSpec",
    "PagedKVSpec",
    "StateSlotSpec",
    "ConvLM",
    "ConvLMConfig",
    "LlamaConfig",
    "Transformer",
    "build_model",
    "checkpoint_names",
    "config_from_dict",
    "expected_tensors",
    "model_spec",
]
