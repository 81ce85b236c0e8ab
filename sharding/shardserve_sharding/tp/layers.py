"""Tensor-parallel layers (vLLM's names), with forward and backward collectives.

For a linear layer Y = X A + b with A of shape [in, out] (torch stores A^T as weight [out, in]):

- ColumnParallelLinear splits A by columns, A = [A_1 ... A_p]: rank i computes Y_i = X A_i
  (+ b_i). X is replicated, so no forward communication; the backward all-reduces dL/dX,
  because every rank's slice contributed to X's gradient. With gather_output the Y_i are
  all-gathered (the vocabulary-parallel output head) and the padding columns dropped.
- RowParallelLinear splits A by rows, A = [A_1; ...; A_p], and X by columns (X_i is exactly
  the output of a preceding column-parallel layer): Y = sum_i X_i A_i, an all-reduce in the
  forward; b is added once, after it. The backward needs no communication.
- VocabParallelEmbedding holds rows [start, end) of the (padded) vocabulary; ids outside give
  zeros and the all-reduce assembles every row.
- Replicated rows (KV heads when tp exceeds their number): several ranks hold a copy of the
  same rows and each copy only sees the gradient of its own rank's query heads, so the
  backward sums the copies' gradients (ReplicatedRows); the replicas then stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cpu_gemm import cpu_linear
from .comm import Comm


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce(grad.clone()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        return comm.all_reduce(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm, ctx.width = comm, x.shape[-1]
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r, w = ctx.comm.rank, ctx.width
        return grad[..., r * w : (r + 1) * w].contiguous(), None


@dataclass(frozen=True)
class ReplicatedRows:
    """Rows of a local column-parallel weight that other TP ranks hold copies of.

    Each (local_start, global_start) pair is `size` rows at local_start in this rank's weight,
    which are rows [global_start, global_start + size) of a `total`-row buffer that every rank
    lays out the same way (for fused QKV: all K heads then all V heads).
    """

    pairs: tuple[tuple[int, int], ...]
    size: int
    total: int


class _SumReplicaGrads(torch.autograd.Function):
    """Identity forward; the backward sums the gradient of replicated rows over their copies."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, comm: Comm, rows: ReplicatedRows) -> torch.Tensor:
        ctx.comm, ctx.rows = comm, rows
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows: ReplicatedRows = ctx.rows
        buf = grad.new_zeros((rows.total, *grad.shape[1:]))  # [total, ...], zeros elsewhere
        for local, glob in rows.pairs:
            buf[glob : glob + rows.size] = grad[local : local + rows.size]
        buf = ctx.comm.all_reduce(buf)  # every copy's contribution, summed
        grad = grad.clone()
        for local, glob in rows.pairs:
            grad[local : local + rows.size] = buf[glob : glob + rows.size]
        return grad, None, None


def copy_to_tp(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    if comm.world_size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    if comm.world_size == 1:
        return x
    if not torch.is_grad_enabled():
        return comm.all_reduce(x)
    return _ReduceFromTP.apply(x, comm)


def gather_from_tp(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    if comm.world_size == 1:
        return x
    if not torch.is_grad_enabled():
        return comm.all_gather(x)
    return _GatherFromTP.apply(x, comm)


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i (+ b_i); weight [output_size_per_partition, input_size]."""

    def __init__(
        self,
        input_size: int,
        output_size_per_partition: int,
        comm: Comm,
        *,
        bias: bool = False,
        gather_output: bool = False,
        output_size: int | None = None,
        replicated_rows: ReplicatedRows | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.comm = comm
        self.gather_output = gather_output
        self.output_size = output_size  # unpadded width after gathering (vocab head)
        self.replicated_rows = replicated_rows  # KV heads held by several ranks
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(output_size_per_partition, input_size, **kw))
        self.bias = nn.Parameter(torch.empty(output_size_per_partition, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters  # not self.weight: nn.Module.__getattr__ costs ~0.5 us a lookup
        w = p["weight"]
        if (self.replicated_rows is not None and torch.is_grad_enabled() and w is not None
                and w.requires_grad):
            w = _SumReplicaGrads.apply(w, self.comm, self.replicated_rows)
        y = cpu_linear(self, copy_to_tp(x, self.comm), w, p.get("bias"))  # [..., out/p]
        if self.gather_output:
            y = gather_from_tp(y, self.comm)  # [..., out_padded]
            if self.output_size is not None and y.shape[-1] != self.output_size:
                y = y[..., : self.output_size]
        return y


class RowParallelLinear(nn.Module):
    """Y = all_reduce(X_i A_i) + b; weight [output_size, input_size_per_partition]."""

    def __init__(
        self,
        input_size_per_partition: int,
        output_size: int,
        comm: Comm,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.comm = comm
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(output_size, input_size_per_partition, **kw))
        self.bias = nn.Parameter(torch.empty(output_size, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters  # not self.weight: nn.Module.__getattr__ costs ~0.5 us a lookup
        y = reduce_from_tp(cpu_linear(self, x, p["weight"], None), self.comm)  # [..., out]
        bias = p.get("bias")
        return y + bias if bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + num_embeddings_per_partition) of the padded vocab."""

    def __init__(
        self,
        num_embeddings_per_partition: int,
        embedding_dim: int,
        comm: Comm,
        *,
        vocab_start: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_start = vocab_start
        self.vocab_end = vocab_start + num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(num_embeddings_per_partition, embedding_dim, dtype=dtype, device=device)
        )

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Local rows ids [B, T] -> [B, T, dim]; a quantized weight (weight None, qweight set
        by quant/apply.py) is dequantized row by row."""
        if self.weight is None:
            return self.qweight.rows(ids)
        return F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            return self._rows(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)  # [B, T]
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = self._rows(local).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.comm)  # [B, T, dim]


class ColumnParallelConv1d(nn.Conv1d):
    """A Conv1d whose output channels are split across ranks (input channels replicated)."""

    def __init__(
        self,
        in_channels: int,
        out_channels_per_partition: int,
        kernel_size: int,
        comm: Comm,
        *,
        bias: bool = True,
        dtype=None,
        device=None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels_per_partition,
            kernel_size,
            bias=bias,
            dtype=dtype,
            device=device,
        )
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(copy_to_tp(x, self.comm))
