"""ImportedLlamaSource: the CheckpointSource members the four importers share.

HF, GGUF, Megatron-LM and DCP checkpoints are read one whole global tensor at a time, handed
over in fp32, unquantized, as the Llama family; a subclass supplies config, tensor(name),
tokenizer() and source_info(). Row and slice reads cut the whole tensor (no positioned reads).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..checkpoint.reader import CheckpointSource
from ..partition import ShardSpec, shard_tensor


class ImportedLlamaSource(CheckpointSource):
    """Shared CheckpointSource members of the importers (see checkpoint/reader.py)."""

    family: ClassVar[str] = "llama"
    quant: ClassVar[None] = None
    positioned_reads: ClassVar[bool] = False
    config: Any

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        from ..models import expected_tensors

        return expected_tensors(self.family, self.config)

    def tensor_dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows [r0, r1) of the whole tensor (read whole: positioned_reads is False)."""
        full = self.tensor(name)
        out.copy_(full.reshape(full.shape[0] if full.dim() else 1, *full.shape[1:])[r0:r1])

    def read_local(self, name: str, target: ShardSpec) -> torch.Tensor:
        return shard_tensor(self.tensor(name), target)

    def close(self) -> None:
        """Nothing to release: each tensor is read and closed as it is asked for."""
