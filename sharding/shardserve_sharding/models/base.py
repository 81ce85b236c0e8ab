"""What every model family provides to the engine, the checkpoint code and the resharder.

A family is a plain torch module (no torch.distributed) plus a frozen config dataclass. The
engine drives every family the same way:

    cache = model.new_cache(batch_size, max_len, dtype=..., device=...)
    cache.begin_step(positions, num_new)        # positions [B, T], num_new [B]
    logits = model(tokens, positions, cache, logits_index)   # tokens [B, T]
    # logits [B, V] with logits_index [B] (one column per row), else [B, T, V]

Every model has `family` (its name in models/registry.py) and `config` (its frozen config).

Prompts of different lengths are right-padded inside one step: row b has `num_new[b]` real
tokens at `positions[b, :num_new[b]]`; the padding columns carry increasing positions past the
real ones and their outputs are ignored. A cache must therefore ignore (or overwrite later)
whatever padding writes, which a causal KV cache does for free and a convolution state does by
reading its state at `num_new`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DecodeCache(Protocol):
    """Per-sequence decoding state (KV cache or convolution state), one row per sequence."""

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        """Prepare a step: positions [B, T] (long), num_new [B] (long, real tokens per row)."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (long [B']) in this order; the others are freed."""
