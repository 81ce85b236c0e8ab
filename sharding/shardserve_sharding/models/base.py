"""What every model family provides to the engine, the checkpoint code and the resharder.

A family is a plain torch module (no torch.distributed) plus a frozen config dataclass. The
engine drives every family the same way:

    cache = model.new_cache(batch_size, max_len, dtype=..., device=...)
    cache.begin_step(positions, num_new)        # positions [B, T], num_new [B]
    logits = model(tokens, positions, cache, logits_index)   # tokens [B, T]

Prompts of different lengths are right-padded inside one step: row b has `num_new[b]` real
tokens at `positions[b, :num_new[b]]`; the padding columns carry increasing positions past the
real ones and their outputs are ignored. A cache must therefore ignore (or overwrite later)
whatever padding writes, which a causal KV cache does for free and a convolution state does by
reading its state at `num_new`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelConfig(Protocol):
    """A frozen dataclass describing one model's shape; serialised into manifest.json."""

    vocab_size: int

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class DecodeCache(Protocol):
    """Per-sequence decoding state (KV cache or convolution state), one row per sequence."""

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        """Prepare a step: positions [B, T] (long), num_new [B] (long, real tokens per row)."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (long [B']) in this order; the others are freed."""


class CausalLM(Protocol):
    """The forward contract shared by all families."""

    family: str
    config: Any

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> DecodeCache: ...

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] long
        positions: torch.Tensor,  # [B, T] long
        cache: DecodeCache | None = None,
        logits_index: torch.Tensor | None = None,  # [B] long: one column per row, or None
    ) -> torch.Tensor:  # [B, V] if logits_index is given else [B, T, V]
        ...
