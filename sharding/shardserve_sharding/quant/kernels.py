"""Quantized linear weights at run time: our AVX512-VNNI / AVX2 kernel for few rows, else
torch's own CPU weight-only kernels.

Where quant/cpu_kernel.py is built (a CPU with AVX2 at least; SHARDSERVE_QUANT_KERNEL=0 turns
it off), calls of at most KERNEL_MAX_ROWS rows (decode) run there over the weight repacked
once at load (never stored; the checkpoint keeps its bytes; for int8 the module keeps only
that copy and unpacks the stored form from it when asked), with integer dot
products over the activation split per 32 columns into two int8 digits (llama.cpp's Q8_1 idea,
one digit more: the result is as exact as fp32 math up to the output's rounding). Otherwise
(no AVX2, no compiler), and for few rows where the dense copy is off:
- int8 per row: `torch.ops.aten._weight_int8pack_mm(x [M, K], q int8 [N, K], scale [N])`, the
  op gpt-fast's WeightOnlyInt8Linear lowers to on CPU (it has no grouped scales: grouped int8
  takes the dense copy there);
- int4: `torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, qparams
  [K/G, N, 2])` over a weight repacked once at load by `_convert_weight_to_int4pack_for_cpu`
  (an opaque, CPU-specific layout: never stored).

Both take bf16 or fp32 activations (scales are cast to the activation dtype at load). They
win where a GEMM streams its weight (few rows: decode); at many rows torch's bf16 GEMM
(oneDNN, AMX where present) is several times faster than either (results/quant_kernels.md:
at 32 rows int8 takes 3.6-4.2x and int4 2.9-3.9x bf16's time). So calls of DENSE_MIN_ROWS
rows or more go through cpu_gemm.cpu_linear over a dense copy of the weight in the run
dtype, dequantized once on first use and cached (never saved): prefill and large decode
batches run as fast as bf16, at the cost of that copy's memory once such a batch has been
seen
(SHARDSERVE_QUANT_DENSE_MIN_ROWS=0 turns the copy off).
torchao is not used: 0.18 (the release for torch 2.13) runs Int8WeightOnlyConfig on CPU
about 2-6x slower than the aten op at 1 row, and has no CPU int4 packing any more ("opaque"
was removed) (loadtest/bench_quant_kernels.py --torchao, results/quant_kernels.md).

A module whose weight is quantized keeps `weight = None` and holds one of these as
`qweight`; models.cpu_gemm.cpu_linear calls it (quant/apply.py wires them in).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..models import amx_gemm
from ..models.cpu_gemm import amx_packed, cpu_linear, packed_bf16, use_amx, use_packed_bf16
from . import cpu_kernel
from .scheme import dequantize_int4, dequantize_int8, unpack_int4

DENSE_MIN_ROWS = int(os.environ.get("SHARDSERVE_QUANT_DENSE_MIN_ROWS", "6"))
"""Matmuls of at least this many rows run over the cached dense copy (0: never). Measured on
a Zen 4 core with AMX/AVX512-BF16 (1 thread, thread CPU time) over SmolLM2's four layer
weights streamed from memory, kernel time / bf16 F.linear time: int8 0.37-0.60 at 1 row,
0.59-0.80 at 4, 1.08-1.33 at 8; int4 g32 0.27-0.36, 0.41-0.61, 0.87-1.25
(loadtest/results/quant_kernels.md): the crossover is 5-8 rows."""


KERNEL_MAX_ROWS = int(os.environ.get("SHARDSERVE_QUANT_KERNEL_MAX_ROWS", "8"))
"""Calls of at most this many rows run in quant/cpu_kernel.py where it is built; more rows take
the dense copy (or, with DENSE_MIN_ROWS=0, the kernel in chunks of 8 rows). Measured on one
Xeon core with AMX (thread CPU time, SmolLM2's shapes, shared machine; results/
quant_kernels.md), whole-model GEMM ms per forward, ours int8 / int4 g32 vs bf16 F.linear: 1 row
5.1 / 3.1 vs 19.1, 8 rows 13.5 / 13.0 vs 20.6, 16 rows 27.8 / 26.0 vs 22.3 (the kernel is
compute-bound from a few rows on: the crossover is 10-14 rows)."""


def _use_dense(x2: torch.Tensor) -> bool:
    return DENSE_MIN_ROWS > 0 and x2.shape[0] >= DENSE_MIN_ROWS


def _use_kernel(owner: nn.Module, x: torch.Tensor) -> bool:
    """Whether owner's kernel copy serves x [..., K]: built, and few rows (an empty batch
    too), or no dense copy and no AMX GEMM. Kept cheap: it runs once per linear layer per
    decode step."""
    if "_kfn" not in owner.__dict__:
        return False
    if x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]:
        return True
    return DENSE_MIN_ROWS <= 0 and not use_amx(x)


def _lean_amx(owner: nn.Module, x: torch.Tensor) -> bool:
    """Whether x [..., K] (more rows than the kernel's) runs the AMX GEMM over owner's kernel
    copy, dequantizing each weight tile as it streams (models/amx_gemm.py): where no dense copy
    is kept (DENSE_MIN_ROWS=0, the lean mode: one weight copy at every row count). Measured
    (SmolLM2, 2 threads, 32-row decode forward): int8-g32 17.5 ms, int4-g32 16.6, against
    16.0-16.2 over the dense copy (which streams twice int8's bytes but converts nothing) and
    ~3.6-4.2x bf16's GEMM time for the int8 kernel in chunks of 8 rows (results/
    quant_kernels.md, an earlier session)."""
    return DENSE_MIN_ROWS <= 0 and "_kw" in owner.__dict__ and use_amx(x)


def _lean_amx_linear(owner: nn.Module, x: torch.Tensor, fn) -> torch.Tensor:
    """x [..., K] @ owner's kernel copy.T -> [..., N] through the AMX GEMM `fn` that
    dequantizes that copy's tiles as they stream (amx_gemm.int8_kernel / int4_kernel)."""
    y = fn(x.view(-1, x.shape[-1]), owner._kw, owner._ks, owner._n)  # [M, N]
    return y.view(*x.shape[:-1], owner._n)


def _dense_linear(owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ owner's dense copy.T -> [..., N] through cpu_linear. Where that GEMM takes
    a copy of its own (the AMX GEMM's tiles, or oneDNN's packed copy), owner._fast = (fewest
    elements, that copy, whether AMX) lets cpu_linear send the rows that take the dense copy
    straight to it (models/cpu_gemm.py): no module or kernel-choice calls per GEMM (120
    SmolLM2 layer GEMMs at 32 rows, 2 threads: int8 6.24 -> 5.75 ms, bf16 5.80). The dense
    copy never changes, so neither does that copy."""
    dense = _dense(owner, x.dtype)
    y = cpu_linear(owner, x, dense, None)  # [..., N]
    if "_fast" not in owner.__dict__:
        fewest = DENSE_MIN_ROWS if "_kfn" not in owner.__dict__ else max(
            DENSE_MIN_ROWS, KERNEL_MAX_ROWS + 1)
        if use_amx(x, dense):  # cpu_linear's AMX branch took it
            owner.__dict__["_fast"] = (fewest * x.shape[-1], amx_packed(owner, dense), True)
        elif use_packed_bf16(x, dense):
            owner.__dict__["_fast"] = (fewest * x.shape[-1], packed_bf16(owner, dense), False)
    return y


def _dense(owner: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """owner's cached dequantized weight [N, K] in dtype (built on first use)."""
    cached = owner.__dict__.get("_dense")
    if cached is None or cached.dtype != dtype:
        cached = owner.dequantize().to(dtype)
        owner.__dict__["_dense"] = cached
    return cached


class Int8Weight(nn.Module):
    """int8 weight with row or group scales; forward(x [..., K]) = x @ (q * scale).T in x's
    dtype.

    One copy of the weight is held: where the kernel is built, only its repacked form (`q`
    and `scale` unpack the stored form from it on demand: the dense copy, the embedding
    lookup); else the stored q [N, K] and scales (torch's `_weight_int8pack_mm` for per-row
    scales; grouped scales take the dense copy, the aten op has no groups)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = q.shape
        sc = scale.float().reshape(n, -1)  # [N, K/G]; G = K for row scales
        self.group_size = k // sc.shape[1]
        self.in_features = k
        self._n = n
        self._dtype = dtype
        mod = cpu_kernel.kernel()
        if mod is not None and self.group_size % cpu_kernel.BLOCK == 0:
            # the kernel's copy: q + 128 in 16-row tiles, [NT, K/G, 16] scales (not buffers:
            # never saved, never cast by .to())
            self.__dict__["_kw"], self.__dict__["_ks"] = cpu_kernel.pack_int8(q, sc)
            self.__dict__["_kfn"] = mod.int8_linear
        else:
            self.register_buffer("_q", q.contiguous())  # [N, K] int8
            # per row: [N] in the run dtype (the aten op's); per group: [N, K/G] float32
            self.register_buffer("_scale", sc[:, 0].to(dtype).contiguous() if sc.shape[1] == 1
                                 else sc.contiguous())

    @property
    def out_features(self) -> int:
        return self._n

    @property
    def q(self) -> torch.Tensor:
        """The stored int8 [N, K] (unpacked from the kernel's copy where that is the one)."""
        if "_kw" in self.__dict__:
            return cpu_kernel.unpack_int8(self._kw, self._ks, self._n)[0]
        return self._q

    @property
    def scale(self) -> torch.Tensor:
        """The stored scales, float32 [N] (per row) or [N, K/G] (per group)."""
        if "_kw" not in self.__dict__:
            return self._scale.float()  # (per row: in the run dtype, as the aten op takes it)
        ks = self._ks  # [NT, K/G, 16]
        sc = ks.float().transpose(1, 2).reshape(-1, ks.shape[1])[: self._n]  # [N, K/G]
        return sc[:, 0] if self.group_size == self.in_features else sc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernel(self, x):
            return self._kfn(x if x.is_contiguous() else x.contiguous(), self._kw, self._ks,
                             self._n, self.group_size)  # [..., N]
        if _lean_amx(self, x):  # no dense copy: the AMX GEMM dequantizes the kernel's copy
            return _lean_amx_linear(self, x, amx_gemm.int8_kernel())  # [..., N]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if _use_dense(x2):
            return _dense_linear(self, x)  # [..., N]
        if "_kfn" in self.__dict__:  # between KERNEL_MAX_ROWS and DENSE_MIN_ROWS rows
            return self._kfn(x.contiguous(), self._kw, self._ks, self._n, self.group_size)
        if self._scale.dim() == 2:  # grouped scales, no kernel: the dense copy
            return _dense_linear(self, x)  # [..., N]
        if x2.dtype != self._scale.dtype:
            x2 = x2.to(self._scale.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self._q, self._scale)  # [M, N]
        return y.view(*x.shape[:-1], -1).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ids [...] -> [..., K] in the run dtype (embedding lookup of the
        same matrix): from the dense copy where the output projection made one (the same
        values, one lookup), else unpacked from the stored form."""
        dense = self.__dict__.get("_dense")
        if dense is not None and dense.dtype == self._dtype:
            return F.embedding(ids, dense)  # [..., K]
        if "_kw" in self.__dict__:
            q, sc = cpu_kernel.unpack_int8(self._kw, self._ks, self._n, ids)  # [R, K], [R, K/G]
        else:
            q, sc = F.embedding(ids.reshape(-1), self._q), self._scale[ids.reshape(-1)].float()
        return dequantize_int8(q, sc).to(self._dtype).view(*ids.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.q, self.scale)  # [N, K] float32


def torch_int4_args(packed: torch.Tensor, qparams: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (packed uint8 [N, K/2], qparams [N, K/G, 2]) -> `_weight_int4pack_mm_for_cpu`'s
    (weight in torch's opaque CPU layout, qparams [K/G, N + pad, 2] in dtype), N padded to a
    multiple of 16 with zero rows (sliced off the result)."""
    n = packed.shape[0]
    pad = -n % 16  # the repacking wants N divisible by 16
    q = unpack_int4(packed).to(torch.int32) + 8  # [N, K] in [0, 15]
    q = F.pad(q, (0, 0, 0, pad), value=8).contiguous()  # [N + pad, K]
    qp = F.pad(qparams.float(), (0, 0, 0, 0, 0, pad))  # [N + pad, K/G, 2]
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
            qp.to(dtype).transpose(0, 1).contiguous())


class Int4Weight(nn.Module):
    """Grouped int4 weight; forward(x [..., K]) = x @ w.T with w = v * scale + offset.

    One copy of the weight is held where the kernel is built: its repacked form (dequantize
    unpacks it, with the (scale, min) pairs as the kernel holds them); else torch's opaque
    layout, plus the stored bytes for the dense copy (DENSE_MIN_ROWS > 0)."""

    def __init__(self, packed: torch.Tensor, qparams: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        n, groups = qparams.shape[0], qparams.shape[1]
        k = packed.shape[1] * 2
        self.group_size = k // groups
        self.in_features = k
        self._n = n
        mod = cpu_kernel.kernel()
        if mod is not None:
            # the kernel's copy: 16-row tiles of nibbles, (scale, min) per tile and group (not
            # buffers: never saved, never cast by .to())
            self.__dict__["_kw"], self.__dict__["_ks"] = cpu_kernel.pack_int4(packed, qparams)
            self.__dict__["_kfn"] = mod.int4_linear
        else:
            tp, qp = torch_int4_args(packed, qparams, dtype)
            self.register_buffer("_torch_packed", tp)  # opaque
            self.register_buffer("qparams", qp)  # [K/G, N + pad, 2] (scale, offset)
            # the stored bytes [N, K/2], kept (not a buffer) for the dense copy
            self.__dict__["_stored"] = packed if DENSE_MIN_ROWS > 0 else None

    @property
    def out_features(self) -> int:
        return self._n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernel(self, x):
            return self._kfn(x if x.is_contiguous() else x.contiguous(), self._kw, self._ks,
                             self._n, self.group_size)  # [..., N]
        if _lean_amx(self, x):  # no dense copy: the AMX GEMM dequantizes the kernel's copy
            return _lean_amx_linear(self, x, amx_gemm.int4_kernel())  # [..., N]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if _use_dense(x2):
            return _dense_linear(self, x)  # [..., N]
        if "_kfn" in self.__dict__:  # between KERNEL_MAX_ROWS and DENSE_MIN_ROWS rows
            return self._kfn(x.contiguous(), self._kw, self._ks, self._n, self.group_size)
        if x2.dtype != self.qparams.dtype:
            x2 = x2.to(self.qparams.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.contiguous(), self._torch_packed, self.group_size, self.qparams)  # [M, N + pad]
        return y[:, : self._n].reshape(*x.shape[:-1], self._n).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (without the kernel: needs the stored bytes kept, DENSE_MIN_ROWS)."""
        if "_kw" in self.__dict__:
            return cpu_kernel.dequantize_int4_pack(self._kw, self._ks, self._n)
        packed = self.__dict__.get("_stored")
        if packed is None:
            raise RuntimeError("the int4 bytes were not kept (SHARDSERVE_QUANT_DENSE_MIN_ROWS=0)")
        return dequantize_int4(packed, self.qparams.transpose(0, 1)[: self._n])
