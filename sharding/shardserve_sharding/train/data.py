"""Training data: a built-in synthetic copy task or a text file, with a validation split.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would, and every layout (DP x TP x PP) sees the same global batch.

Synthetic task: lines "c a b h = c a b h" for random 4-letter words over 8 letters (letters
spaced so that each is one token); a model that learned it completes "c a b h =" with
" c a b h". Tokenized with a byte-level BPE trained on the task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LETTERS = "abcdefgh"


def copy_task_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = " ".join(rng.choice(LETTERS) for _ in range(4))
        out.append(f"{w} = {w}\n")
    return out


@dataclass
class TokenStream:
    """Token ids split into train and validation parts."""

    train: torch.Tensor  # [N] long
    val: torch.Tensor  # [M] long
    tokenizer: Any

    def batch(
        self, split: str, step: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets [batch_size, seq_len] for this step (deterministic)."""
        data = self.train if split == "train" else self.val
        if data.numel() <= seq_len + 1:
            raise ValueError(f"{split} split has {data.numel()} tokens, need > {seq_len + 1}")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split == "val"))
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # [B, T+1]
        window = data[idx]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def synthetic_stream(seed: int = 0, n_lines: int = 4000, vocab_size: int = 300) -> TokenStream:
    from ..tokenizer import train_bpe

    lines = copy_task_lines(n_lines, seed)
    tok = train_bpe(lines, vocab_size=vocab_size)
    ids = torch.tensor(tok.encode("".join(lines), add_special_tokens=False), dtype=torch.long)
    cut = int(ids.numel() * 0.9)
    return TokenStream(ids[:cut], ids[cut:], tok)


def text_stream(path: str | Path, tokenizer: Any = None, vocab_size: int = 2048) -> TokenStream:
    """A text file: tokenized with `tokenizer`, or a byte-level BPE trained on it."""
    from ..tokenizer import train_bpe

    text = Path(path).read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"{path}: empty training text")
    if tokenizer is None:
        tokenizer = train_bpe(text.splitlines(keepends=True), vocab_size=vocab_size)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    cut = int(ids.numel() * 0.9)
    return TokenStream(ids[:cut], ids[cut:], tokenizer)
