"""CheckpointSource: what every checkpoint reader gives the resharder, the loaders and export.

Five readers implement it: ShardserveSource (our own format, checkpoint/source.py) and the
importers' HFLlamaSource, GGUFLlamaSource, MegatronSource and DCPSource (importers/). Callers
use these members only, never hasattr checks: a reader without a cheap row read says so with
`positioned_reads = False` (its read_rows reads the whole tensor each call, so the resharder
takes tensor() once instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ..partition import ShardSpec
    from ..quant.scheme import QuantConfig


@runtime_checkable
class CheckpointSource(Protocol):
    """A checkpoint of any format seen as shardserve tensors (global names and shapes)."""

    family: str
    """The model family (models/registry.py), set by the reader itself."""
    config: Any
    """The family's frozen config."""
    quant: QuantConfig | None
    """How stored weights are quantized (our own format only), or None."""
    positioned_reads: bool
    """True when read_rows reads only the rows asked for (the resharder streams them)."""

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's float dtype (importers hand over fp32)."""
        ...

    def names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, global shape) of every stored tensor, in checkpoint order."""
        ...

    def tensor_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor(name) and read_rows(name, ...) give (int8 / uint8 when quantized)."""
        ...

    def tensor(self, name: str) -> torch.Tensor:
        """The global tensor `name`."""
        ...

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor) -> None:
        """Fill out ([r1 - r0, *shape[1:]], tensor_dtype(name)) with global rows [r0, r1)."""
        ...

    def read_local(self, name: str, target: ShardSpec) -> torch.Tensor:
        """Only the rows or columns one TP rank keeps (target: its ShardSpec)."""
        ...

    def tokenizer(self) -> Any:
        """The stored TokenizerBundle, or None when the format stores none."""
        ...

    def source_info(self) -> dict[str, Any]:
        """What the manifest records about where the weights came from."""
        ...

    def close(self) -> None:
        """Release open files (a no-op for readers that keep none)."""
        ...
