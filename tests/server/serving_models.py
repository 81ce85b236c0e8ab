"""Tiny random models, their checkpoints and a reference greedy decoder for the serving tests.

Used by test_paged_cache.py, test_scheduler.py and test_workers.py (imported by name, like
tests/sharding/tp_cases.py). Nothing here is a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardserve_sharding.checkpoint.io import write_checkpoint
from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
from shardserve_sharding.models import ConvLMConfig, LlamaConfig, build_model, checkpoint_names
from shardserve_sharding.models.rnnlm import RNNLMConfig
from shardserve_sharding.tokenizer import train_bpe

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a shard worker serves one slice of the model",
    "continuous batching keeps every row of the batch busy",
] * 8


def tokenizer() -> Any:
    return train_bpe(CORPUS, vocab_size=300)


def tiny_config(family: str, vocab_size: int = 300, max_seq_len: int = 128) -> Any:
    """GQA llama (4 query / 2 KV heads, TP 1 or 2), a conv LM (kernel 3, TP 1 or 2) or a
    recurrent LM (LSTM, 12 units, TP 1, 2 or 3)."""
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           intermediate_size=64, rope_theta=1000.0, tie_embeddings=False,
                           max_seq_len=max_seq_len)
    if family == "rnnlm":
        return RNNLMConfig(vocab_size=vocab_size, dim=16, hidden=12, n_layers=2,
                           tie_embeddings=False, max_seq_len=max_seq_len)
    return ConvLMConfig(vocab_size=vocab_size, dim=16, hidden=24, n_layers=2, kernel_size=3,
                        tie_embeddings=False, max_seq_len=max_seq_len)


def random_model(family: str, config: Any = None, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and large enough that greedy choices are far from ties."""
    config = config or tiny_config(family)
    torch.manual_seed(seed)
    model = build_model(family, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.4 * torch.randn_like(p))
    return model.eval()


def write_model(dst: Path, model: torch.nn.Module, tok: Any = None) -> Path:
    """The model as a TP=1, PP=1 fp32 checkpoint (with a tokenizer when given)."""
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    return write_checkpoint(
        dst, family=model.family, config=model.config.to_dict(),
        tensors=[(n, params[n].detach()) for n in names],
        specs=[TensorSpec(n, torch.float32, tuple(params[n].shape)) for n in names],
        tokenizer=tok,
    )


def tiny_checkpoint(dst: Path, family: str, seed: int = 0) -> Path:
    tok = tokenizer()
    model = random_model(family, tiny_config(family, vocab_size=tok.vocab_size), seed)
    return write_model(dst, model, tok)


@torch.inference_mode()
def greedy_no_cache(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by a full forward over the whole sequence for every token."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        toks = torch.tensor([ids])
        logits = model(toks, torch.arange(len(ids))[None])[0, -1]
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())
