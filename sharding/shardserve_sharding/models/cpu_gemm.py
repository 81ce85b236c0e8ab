"""CPU GEMM paths for bf16 inference, chosen per machine at run time.

Two kinds of CPU run our bf16 models (see ../shared FACTS): those with bf16 instructions
(AVX512-BF16, AMX), where oneDNN has real bf16 kernels, and AVX2-only ones, where torch
emulates bf16 element by element. `cpu_linear` is the one entry the model's and the TP code's
linear layers call:

- native bf16: torch's bf16 GEMM (oneDNN), or the same over a copy of the weight packed
  (reordered) for oneDNN once, `packed_bf16`: on one thread of a Xeon with AMX, SmolLM2's
  GEMMs per forward, ms, 1 row 34.4 -> 21.0, 32 rows 46.1 -> 27.9, 132 rows 99.1 -> 77.1, 512
  rows 180 -> 152 (loadtest/bench_cpu_gemm.py); with 2 threads on a quiet machine it is
  faster up to 256 rows and slower from 384 (loadtest/results/engine.md section 7): by default
  GEMMs of at most PACKED_BF16_MAX_ROWS rows take it; of those, GEMMs of at most
  bf16_gemv.MAX_ROWS rows (decode at batch 1-2) take our AVX512-BF16 GEMV over the plain
  weight instead, where it is built (models/bf16_gemv.py: no per-call set-up, prefetched rows),
  and where the AMX GEMM is built (models/amx_gemm.py), every bf16 inference GEMM of
  amx_gemm.MIN_ROWS rows or more takes it, over its own tile-layout copy of the weight, in
  place of both oneDNN paths (at 32 rows 9.5 ms a SmolLM2 step against oneDNN packed's 14.4;
  at 512 rows 47.8 against F.linear's 52.6);
- emulated bf16: GEMMs of BF16_GEMM_AS_FP32_MIN_ROWS rows or more run in fp32 over a cached
  (packed) fp32 copy, which is several times faster than the emulation;
- anything else (fp32, training, autograd): plain F.linear;
- a quantized weight (weight None, owner.qweight set by quant/apply.py): owner.qweight(x),
  torch's int8 / int4 weight-only kernels (quant/kernels.py).

The cached copies live in the owning module's __dict__ (never saved, never a parameter) and
are rebuilt when the weight changes. Inside torch.compile only prepared copies are read.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import amx_gemm, bf16_gemv

BF16_GEMM_AS_FP32_MIN_ROWS = 5
"""bf16 matmuls with at least this many rows run as fp32 GEMMs where bf16 is emulated. Measured
on 2 AVX2 cores (Zen 4 without AVX-512 exposed) over SmolLM2's matrices, ms per pass, torch's
bf16 kernel / oneDNN fp32 over packed weights: 1 row 11/26, 2 rows 17-23/23-30, 3 rows
23-26/30-34, 4 rows 29-33/30-34, 6 rows 46-62/36-43: the crossover is 4-5 rows. (Over MKL's
fp32 GEMM it was ~13 rows: 12 rows 198/151, 14 rows 108/161.)"""
_FP32_BLOCK = 1 << 21
"""Weight elements upcast at a time by `linear_bf16_as_fp32` (8 MB: stays in the L3 cache)."""


_NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
"""oneDNN has real bf16 kernels on this CPU (AVX512-BF16, AMX or AVX-NE-CONVERT)."""


def bf16_emulated(t: torch.Tensor) -> bool:
    """True for a bf16 CPU tensor on a CPU without bf16 instructions (no AVX512-BF16/AMX).

    There torch's bf16 matmul and attention kernels convert element by element (about 15
    GFLOP/s per core), several times slower than fp32 ones; computing in fp32 is faster and
    at least as accurate (bf16 values are exact in fp32).
    """
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not _NATIVE_BF16


FP32_SHADOW = os.environ.get("SHARDSERVE_FP32_SHADOW", "1") != "0"
"""Where bf16 is emulated, keep an fp32 copy of each bf16 weight for GEMMs of many rows (built
on first use, rebuilt if the weight changes), packed for oneDNN's fp32 GEMM where torch has
it. Measured on 2 AVX2 cores over SmolLM2's matrices, ms per pass: MKL over a plain fp32 copy
62 at 16 rows, 101 at 32, 314 at 100; oneDNN over the packed copy 45, 69, 222 (upcasting
blocks every step instead: 270 at 32 rows). Costs 2x the bf16 weight bytes of memory;
SHARDSERVE_FP32_SHADOW=0 turns it off (blocks are upcast per call)."""

_PACKED_GEMM = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                "_linear_pointwise")
_PACK_ROWS_HINT = 16
"""Rows oneDNN blocks the packed weight for (measured: 16 as fast as 64 or 256 at 4-100 rows,
1 is 1.2-2x slower)."""


def _cached_copy(owner: torch.nn.Module, weight: torch.Tensor, slot: str,
                build) -> torch.Tensor:
    """owner's copy of `weight` made by build(weight), cached in owner.__dict__[slot] (not a
    parameter or buffer, so never saved) and rebuilt when the weight changes."""
    # inference tensors keep no version counter (and cannot change outside inference mode);
    # weight.data = ... keeps the version but moves data_ptr
    version = -1 if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, weight.shape, weight.dtype)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = (key, build(weight.detach()))
        owner.__dict__[slot] = cached
    return cached[1]


def fp32_shadow(owner: torch.nn.Module, weight: torch.Tensor,
                packed: bool = False) -> torch.Tensor | None:
    """owner's cached fp32 copy of `weight`, packed for oneDNN if asked (None when FP32_SHADOW
    is off)."""
    if not FP32_SHADOW:
        return None
    if packed:  # [out, in] fp32 reordered for oneDNN: opaque
        return _cached_copy(owner, weight, "_fp32_packed", lambda w: torch.ops.mkldnn.
                            _reorder_linear_weight(w.float(), _PACK_ROWS_HINT))
    return _cached_copy(owner, weight, "_fp32_shadow", lambda w: w.float())  # [out, in]


def prepare_fp32_shadows(model: torch.nn.Module) -> int:
    """Build the plain fp32 copy of every bf16 Linear weight where bf16 is emulated, eagerly,
    for a torch.compile'd model (the compiled graph reads them, see `fp32_gemm`); returns how
    many. The compiled graph does not notice later weight changes: compile after loading. The
    eager forwards (prefill) still use the packed copy: 4x the bf16 weight bytes in all."""
    n = 0
    for mod in model.modules():
        if (isinstance(mod, nn.Linear) and bf16_emulated(mod.weight)
                and fp32_shadow(mod, mod.weight) is not None):
            n += 1
    return n


def gemm_as_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T should run as an fp32 GEMM: bf16 inference of at least
    BF16_GEMM_AS_FP32_MIN_ROWS rows on a CPU that emulates bf16."""
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and not torch.is_grad_enabled()
        and x.numel() >= BF16_GEMM_AS_FP32_MIN_ROWS * x.shape[-1]
        and bf16_emulated(x)
    )


def fp32_gemm(owner: torch.nn.Module | None, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) of bf16 tensors where `gemm_as_fp32` says so: oneDNN over
    owner's packed fp32 copy (eager), MKL over a plain fp32 copy (inside torch.compile, which
    cannot lower the packed op), or block-wise upcasts without an owner or FP32_SHADOW.

    Inside torch.compile the copy is only read, never checked or built (data_ptr and version
    checks break the graph, and the resumed graphs of 30 layers then recompiled past dynamo's
    limit: bf16 batch-8 decode ran at half speed); `prepare_fp32_shadows` builds it first."""
    if torch.compiler.is_compiling():
        cached = getattr(owner, "_fp32_shadow", None) if owner is not None else None
        return linear_bf16_as_fp32(x, weight, bias, None if cached is None else cached[1])
    shadow = fp32_shadow(owner, weight, _PACKED_GEMM) if owner is not None else None
    if shadow is not None and _PACKED_GEMM:
        b32 = None if bias is None else bias.float()
        return torch.ops.mkldnn._linear_pointwise(
            x.float(), shadow, b32, "none", [], "").to(x.dtype)  # [..., out]
    return linear_bf16_as_fp32(x, weight, bias, shadow)


def linear_bf16_as_fp32(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    weight32: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 tensors, computed by an fp32 GEMM: over weight32 (an fp32
    copy of weight) when given, else upcasting the weight a block of rows at a time (each block
    is used while still in cache); the result is bf16."""
    x32 = x.float()  # [..., in]
    if weight32 is not None:
        b32 = None if bias is None else bias.float()
        return F.linear(x32, weight32, b32).to(x.dtype)  # [..., out]
    rows = max(1, _FP32_BLOCK // weight.shape[1])
    if weight.shape[0] <= rows:
        b32 = None if bias is None else bias.float()
        return F.linear(x32, weight.float(), b32).to(x.dtype)  # [..., out]
    out = x.new_empty(*x.shape[:-1], weight.shape[0])  # [..., out]
    for r in range(0, weight.shape[0], rows):
        b32 = None if bias is None else bias[r : r + rows].float()
        out[..., r : r + rows] = F.linear(x32, weight[r : r + rows].float(), b32)
    return out


@torch.library.custom_op("shardserve::gemv", mutates_args=())
def opaque_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) as one opaque call inside torch.compile graphs. Inductor lowers a
    linear to mm over a transposed view of the weight; for SmolLM2's bf16 batch-1 decode step
    on 2 AVX2 cores that took 0.96 s per 64 tokens against 0.89 s through F.linear (torch's
    bf16 GEMV kernel), a 7% gain measured once (cProfile, compiled LocalEngine)."""
    return F.linear(x, weight)


@opaque_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_PACKED_MODE = os.environ.get("SHARDSERVE_PACKED_BF16", "auto")

PACKED_BF16_MAX_ROWS = 256
"""Where bf16 is native, GEMMs of at most this many rows run over the packed bf16 copy by
default (SHARDSERVE_PACKED_BF16 unset or "auto"). Set from `loadtest/bench_cpu_gemm.py
--threads 2` on a quiet 2-vCPU Xeon with AMX (2026-12-06 09:05, loadtest/results/engine.md
section 7): SmolLM2's GEMMs per forward, F.linear / packed, were 2.08x at 1 row, 1.73x at 32,
1.51x at 100, 1.24x at 256, then 0.95x at 384 and 0.91x at 512."""

PACKED_BF16 = _NATIVE_BF16 and _PACKED_GEMM and _PACKED_MODE != "0"
"""Native-bf16 CPUs may run inference GEMMs over a oneDNN-packed copy of each bf16 weight:
SHARDSERVE_PACKED_BF16=1 for every GEMM, unset/"auto" for GEMMs of at most
PACKED_BF16_MAX_ROWS rows, an integer N > 1 for GEMMs of at most N rows (for A/B runs), 0
never. Costs one more copy of the weight bytes (built on the first GEMM that uses it)."""


def _rows_limit(mode: str) -> int | None:
    """The most rows a packed GEMM takes under SHARDSERVE_PACKED_BF16=mode (None: no limit)."""
    if mode == "1":
        return None
    if mode.isdigit() and int(mode) > 1:
        return int(mode)
    return PACKED_BF16_MAX_ROWS


_PACKED_ROWS_LIMIT = _rows_limit(_PACKED_MODE)


def use_amx(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether x [..., K] @ weight.T takes the AMX GEMM: bf16 inference of amx_gemm.MIN_ROWS
    rows or more, outside torch.compile, with the kernel built, and a bf16 weight of N a
    multiple of 16 (None: x's side only, for a copy already made). Cheapest tests first:
    cpu_linear asks it for every GEMM."""
    return (x.dtype is _BF16 and not torch.compiler.is_compiling() and amx_gemm.fits_rows(x)
            and (weight is None or (weight.dtype is _BF16 and weight.shape[0] % 16 == 0))
            and not torch.is_grad_enabled() and x.is_cpu and amx_gemm.kernel() is not None)


def amx_packed(owner: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """owner's cached copy of `weight` in the AMX GEMM's tile layout (amx_gemm.pack)."""
    return _cached_copy(owner, weight, "_amx_packed", amx_gemm.pack)


def packed_bf16(owner: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """owner's cached bf16 copy of `weight` reordered for oneDNN's GEMM (opaque layout)."""
    return _cached_copy(owner, weight, "_bf16_packed", lambda w: torch.ops.mkldnn.
                        _reorder_linear_weight(w.contiguous(), _PACK_ROWS_HINT))


def use_packed_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T should run over the packed bf16 copy: bf16 inference on a CPU with
    bf16 instructions, of few enough rows (PACKED_BF16), outside torch.compile (which cannot
    lower the packed op). Cheapest tests first: cpu_linear asks it for every GEMM."""
    return (PACKED_BF16 and x.dtype is _BF16 and weight.dtype is _BF16
            and (_PACKED_ROWS_LIMIT is None
                 or x.numel() <= _PACKED_ROWS_LIMIT * x.shape[-1])
            and not torch.is_grad_enabled() and x.is_cpu
            and not torch.compiler.is_compiling())


_BF16 = torch.bfloat16
_packed_linear = torch.ops.mkldnn._linear_pointwise if _PACKED_GEMM else None


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] over W's packed bf16 copy (`packed_bf16`), no bias; for
    a quantized weight's dense copy, which never changes (cpu_linear's shortcut for it skips
    the cache-key checks)."""
    return _packed_linear(x, packed, None, "none", [], "")


def cpu_linear(owner: torch.nn.Module | None, x: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) [..., in] -> [..., out] by the fastest path this CPU has
    (module docstring); `owner` holds the cached weight copies (None: no caching), or the
    quantized weight when `weight` is None.

    Called for every GEMM of a forward (121 per SmolLM2 step), so the choice costs little:
    where bf16 is native the fp32 test (never true there) is skipped, and the packed test
    runs its cheapest checks first (with the direct parameter reads of the linear layers,
    ~6 us less per call on the 2-vCPU Xeon: loadtest/bench_linear_call.py, engine.md section 6)."""
    if weight is None:
        q = owner._modules["qweight"]
        # (fewest elements, the dense copy's AMX tiles or packed copy, whether AMX):
        # quant/kernels.py _dense_linear; what q.forward would run for these rows
        fast = q.__dict__.get("_fast")
        if fast is not None and x.numel() >= fast[0] and (
                use_amx(x) if fast[2] else use_packed_bf16(x, fast[1])):
            y = amx_gemm.linear(x, fast[1]) if fast[2] else packed_linear(x, fast[1])
        else:
            y = q.forward(x)  # [..., out] (no module hooks: skip __call__)
        return y if bias is None else y + bias
    if _NATIVE_BF16:
        if owner is not None and bias is None and use_amx(x, weight):
            return amx_gemm.linear(x, amx_packed(owner, weight))  # [..., out]
        if owner is not None and use_packed_bf16(x, weight):
            if bias is None and bf16_gemv.fits(x, weight) and bf16_gemv.kernel() is not None:
                return bf16_gemv.gemv(x, weight)  # [..., out]
            return _packed_linear(x, packed_bf16(owner, weight), bias, "none", [],
                                  "")  # [..., out]
    elif gemm_as_fp32(x, weight):
        return fp32_gemm(owner, x, weight, bias)
    if bias is None and x.dtype is _BF16 and torch.compiler.is_compiling():
        return opaque_linear(x, weight)  # [..., out]
    return F.linear(x, weight, bias)
