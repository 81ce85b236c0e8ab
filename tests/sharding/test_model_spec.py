"""ModelSpec registry: every family declares a consistent spec, and nothing outside models/
branches on a family's name (a new family touches models/ and the split table only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from shardserve_sharding.models import (
    NAMED_CONFIGS,
    SPECS,
    CacheKind,
    PagedKVSpec,
    StateSlotSpec,
    checkpoint_names,
    config_from_dict,
    model_spec,
)
from shardserve_sharding.partition import TPGeometry
from shardserve_sharding.split_table import split_kind

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_spec_is_consistent(family):
    spec = model_spec(family)
    assert spec.name == family and spec.model_cls.family == family
    assert "tiny" in spec.configs  # every family has a tiny named config for tests
    for name, cfg in spec.configs.items():
        assert config_from_dict(family, cfg.to_dict()) == cfg
        assert NAMED_CONFIGS[spec.config_prefix + name] == (family, cfg)
    cfg = spec.configs["tiny"]
    model = spec.build(cfg)
    for name in checkpoint_names(model):
        split_kind(family, name)  # every stored tensor has a rule in the one table
    geo = TPGeometry.of(family, cfg)
    assert geo.vocab_size == cfg.vocab_size
    cache = spec.cache_spec(model)
    assert cache.kind is spec.cache_kind and cache.n_layers == cfg.n_layers
    assert isinstance(cache, PagedKVSpec if spec.cache_kind is CacheKind.PAGED_KV
                      else StateSlotSpec)
    if isinstance(cache, StateSlotSpec):  # the model's own cache has the pool's row shape
        state = model.new_cache(3, 8, dtype=torch.float32, device="cpu").state
        assert tuple(state.shape) == (cfg.n_layers, 3, *cache.state_shape)
        assert hasattr(cache.state_cls, "from_tensor")


def test_unknown_family_and_config_name_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'rwkv'; known: \['convlm'"):
        model_spec("rwkv")
    with pytest.raises(ValueError, match=r"unknown rnnlm config 'huge'; known: \["):
        model_spec("rnnlm").named_config("huge")


def test_no_family_name_branches_outside_models():
    """`family == "..."`-style branches belong in a ModelSpec. hf_export.py is a Llama-format
    writer (it refuses other families by name), the importers read Llama formats."""
    allowed = {"sharding/shardserve_sharding/hf_export.py"}
    pattern = re.compile(r"family\s*[!=]=|==\s*\"(llama|convlm|rnnlm)\"")
    found = []
    for pkg in ("server/shardserve_server", "sharding/shardserve_sharding"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if "/models/" in rel or "/importers/" in rel or rel in allowed:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, found
