"""The int4 / int8 GEMV kernel (quant/cpu_kernel.py), each code path this CPU can run
(AVX512-VNNI, and the AVX-VNNI / AVX2 builds forced by SHARDSERVE_QUANT_ISA's values), against
its plain-torch reference (the same int8 activation blocks, float64 sums) and the reference
against the exact product with the kernel's weights (off by at most the activation's rounding,
half a block step per column): random shapes with odd output counts (padded 16-row tiles),
every int4 group size, 1-8 rows and chunks beyond, fp32 / bf16 activations, fp16 and fp32
scale packs, int8 per row and per group.

Errors are measured against the size of the products' terms, mag = |x| @ |w|.T (a single
output of a few columns can cancel to near zero, where max|ref| says nothing)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tp_cases import rel_err

from shardserve_sharding.quant import cpu_kernel
from shardserve_sharding.quant.kernels import Int4Weight, Int8Weight
from shardserve_sharding.quant.scheme import (
    INT4_GROUP_SIZES,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

pytestmark = pytest.mark.skipif(
    cpu_kernel.kernel() is None,
    reason="quantized GEMV kernel not built here (no AVX2, no compiler, or disabled)")
PROPERTY = settings(deadline=None, max_examples=25)
ISAS = [isa for isa in cpu_kernel.ISAS if cpu_kernel.kernel(isa) is not None]
"""The builds this CPU runs (.ci/setup builds them all once)."""


def _within(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
            t: float) -> bool:
    """max|y - ref| <= t * max(|x| @ |w|.T): x [M, K], w [N, K]."""
    mag = x.double().abs() @ w.double().abs().T  # [M, N]
    return float((y.double() - ref.double()).abs().max()) <= t * float(mag.max())


def _activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N]: sum over columns of |w| * step, the most the two-digit int8 activation (error
    at most one step per column) can move y when the integer dot products run over w [N, K]
    (int8: the weight; int4: v * scale)."""
    _, step, _ = cpu_kernel.quantize_activation(x)  # [M, K/32]
    per_col = step.repeat_interleave(cpu_kernel.BLOCK, dim=1)  # [M, K]
    return per_col @ w.double().abs().T * (1 + 1e-6) + 1e-12


def _case(seed: int, m: int, n: int, k: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05  # [N, K]
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)  # [M, K]
    return w, x


@given(seed=st.integers(0, 2**16), m=st.integers(1, 8), n=st.integers(1, 70),
       blocks=st.integers(1, 3), group=st.sampled_from(INT4_GROUP_SIZES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), isa=st.sampled_from(ISAS))
@PROPERTY
def test_int4_kernel_equals_its_reference(seed, m, n, blocks, group, dtype, isa):
    """int4: the kernel within 1e-5 (fp32 out) / 8e-3 (bf16 out) of its reference, the
    reference within the activation's rounding of x @ w.T (w: the kernel's scales), and that
    within 1e-3 of x @ dequantize(stored).T (fp16 scales)."""
    w, x = _case(seed, m, n, blocks * group, dtype)
    packed, qp = quantize_int4(w, group)
    kw, ks = cpu_kernel.pack_int4(packed, qp)
    y = cpu_kernel.kernel(isa).int4_linear(x, kw, ks, n, group)  # [M, N]
    ref = cpu_kernel.reference_int4(x, packed, qp)
    assert y.shape == (m, n) and y.dtype == dtype
    wq = dequantize_int4(packed, qp)  # [N, K] the stored weights
    assert _within(y, ref, x, wq, 1e-5 if dtype == torch.float32 else 8e-3)
    sm = cpu_kernel.int4_scales(qp)  # (scale, min) as the kernel holds them
    wk = dequantize_int4(packed, torch.stack([sm[..., 0], sm[..., 1] + 8 * sm[..., 0]], -1))
    exact = x.double() @ wk.double().T
    vs = dequantize_int4(packed, torch.stack([sm[..., 0], torch.zeros_like(sm[..., 0])], -1))
    assert bool(((ref - exact).abs() <= _activation_bound(x, vs)).all())
    assert _within(exact, x.double() @ wq.double().T, x, wq, 1e-3)


@given(seed=st.integers(0, 2**16), m=st.integers(1, 8), n=st.integers(1, 70),
       blocks=st.integers(1, 4), group=st.sampled_from([0, 32, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), isa=st.sampled_from(ISAS))
@PROPERTY
def test_int8_kernel_equals_its_reference(seed, m, n, blocks, group, dtype, isa):
    """int8 per row (group 0) or per group: the kernel within 1e-5 / 8e-3 of its reference,
    which is within the activation's rounding of x @ dequantize(w).T; the pack unpacks to the
    stored tensors (the one copy a module keeps)."""
    k = blocks * max(group, 32)
    w, x = _case(seed, m, n, k, dtype)
    q, scale = quantize_int8(w, None, group)
    kw, ks = cpu_kernel.pack_int8(q, scale)
    uq, us = cpu_kernel.unpack_int8(kw, ks, n)
    assert torch.equal(uq, q) and torch.equal(us.reshape(scale.shape), scale)
    y = cpu_kernel.kernel(isa).int8_linear(x, kw, ks, n, group or k)  # [M, N]
    ref = cpu_kernel.reference_int8(x, q, scale)
    assert y.shape == (m, n) and y.dtype == dtype
    wq = dequantize_int8(q, scale)  # [N, K]
    assert _within(y, ref, x, wq, 1e-5 if dtype == torch.float32 else 8e-3)
    exact = x.double() @ wq.double().T
    assert bool(((ref - exact).abs() <= _activation_bound(x, wq)).all())


@pytest.mark.parametrize("m", [9, 19])
def test_rows_beyond_eight_run_in_chunks(m):
    """More than 8 rows: chunks of 8 over the same tiles, each row as if alone."""
    w, x = _case(m, m, 45, 96, torch.float32)
    packed, qp = quantize_int4(w, 32)
    kw, ks = cpu_kernel.pack_int4(packed, qp)
    y = cpu_kernel.kernel().int4_linear(x, kw, ks, 45, 32)
    assert rel_err(y, cpu_kernel.reference_int4(x, packed, qp)) <= 1e-5
    one = cpu_kernel.kernel().int4_linear(x[m - 1:].contiguous(), kw, ks, 45, 32)
    assert rel_err(y[m - 1:], one) <= 1e-6
    q, scale = quantize_int8(w)
    kw8, ks8 = cpu_kernel.pack_int8(q, scale)
    y8 = cpu_kernel.kernel().int8_linear(x, kw8, ks8, 45, 96)
    assert rel_err(y8, cpu_kernel.reference_int8(x, q, scale)) <= 1e-5


def test_scales_fp16_can_not_hold_stay_fp32():
    """Scales below fp16's normal range are packed as fp32 (no precision lost); GGUF-like ones
    as fp16; a zero row gives zeros."""
    w, x = _case(1, 3, 40, 64, torch.float32)
    packed, qp = quantize_int4(w, 32)
    assert cpu_kernel.pack_int4(packed, qp)[1].dtype == torch.float16
    tiny = qp * 1e-6
    kw, ks = cpu_kernel.pack_int4(packed, tiny)
    assert ks.dtype == torch.float32
    y = cpu_kernel.kernel().int4_linear(x, kw, ks, 40, 32)
    assert rel_err(y, cpu_kernel.reference_int4(x, packed, tiny)) <= 1e-5
    zero = torch.zeros_like(qp)
    kw, ks = cpu_kernel.pack_int4(torch.zeros_like(packed), zero)
    assert torch.equal(cpu_kernel.kernel().int4_linear(x, kw, ks, 40, 32), torch.zeros(3, 40))


def test_zero_activation_rows_and_mismatched_packs():
    """An all-zero row (block max 0) gives zeros; a pack that does not match x is a clear
    error, not a read past its end."""
    w, _ = _case(2, 1, 20, 64, torch.float32)
    q, scale = quantize_int8(w)
    kw, ks = cpu_kernel.pack_int8(q, scale)
    x = torch.zeros(2, 64)
    assert torch.equal(cpu_kernel.kernel().int8_linear(x, kw, ks, 20, 64), torch.zeros(2, 20))
    with pytest.raises(RuntimeError, match="does not match"):
        cpu_kernel.kernel().int8_linear(torch.zeros(1, 96), kw, ks, 20, 96)
    with pytest.raises(RuntimeError, match="does not match"):
        cpu_kernel.kernel().int8_linear(x, kw, ks, 40, 64)
    with pytest.raises(RuntimeError, match="does not match"):
        cpu_kernel.kernel().int8_linear(x, kw, ks, 20, 32)  # row scales read as groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_route_few_rows_of_any_layout_to_the_kernel(dtype):
    """Int8Weight / Int4Weight: [B, T, K] inputs, strided ones and an empty batch take the
    kernel and equal its reference; many rows take the dense copy (x @ dequantize(w).T)."""
    w, _ = _case(3, 1, 37, 96, torch.float32)
    x = (torch.randn(3, 2, 96, generator=torch.Generator().manual_seed(4)) * 2).to(dtype)
    strided = torch.randn(96, 2, generator=torch.Generator().manual_seed(5)).to(dtype).T
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    q, scale = quantize_int8(w)
    packed, qp = quantize_int4(w, 32)
    i8, i4 = Int8Weight(q, scale, dtype), Int4Weight(packed, qp, dtype)
    refs = {i8: lambda a: cpu_kernel.reference_int8(a, q, scale),
            i4: lambda a: cpu_kernel.reference_int4(a, packed, qp)}
    for mod, ref in refs.items():
        y = mod(x)  # 6 rows: the kernel
        assert y.shape == (3, 2, 37) and y.dtype == dtype
        assert _within(y.reshape(6, 37), ref(x.reshape(6, 96)), x.reshape(6, 96), w, tol)
        assert _within(mod(strided), ref(strided.contiguous()), strided, w, tol)
        assert mod(x[:0]).shape == (0, 2, 37)
        many = x.reshape(6, 96).repeat(2, 1)  # 12 rows: the dense copy
        dense = many.float() @ mod.dequantize().to(dtype).float().T
        assert rel_err(mod(many), dense) <= (1e-5 if dtype == torch.float32 else 2e-2)
