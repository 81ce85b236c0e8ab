"""The AMX bf16 GEMM (models/amx_gemm.py) equals its fp32-sum reference to an ulp at every row
count (tails of 16-row tiles, several 32-row blocks), odd output tiles, 1 and 2 threads; its
weight copy is AMX's B-tile layout; over the quantized kernel's int8 / int4 packs it equals
itself over their dense bf16 copies bit for bit; it refuses what it cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_threads import torch_threads

from shardserve_sharding.models import amx_gemm
from shardserve_sharding.models.cpu_gemm import use_amx
from shardserve_sharding.quant import cpu_kernel
from shardserve_sharding.quant.scheme import dequantize_int8, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(amx_gemm.kernel() is None,
                                reason="no AMX-BF16 here (or no compiler): oneDNN's GEMM runs")


@pytest.mark.parametrize("rows", [3, 15, 16, 17, 31, 32, 45, 100])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, k", [(16, 32), (48, 64), (960, 576), (576, 1536)])
def test_amx_gemm_equals_reference(rows, threads, n, k):
    g = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)  # [M, K]
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)  # [N, K]
    with torch_threads(threads):
        got = amx_gemm.kernel()(x, amx_gemm.pack(w))  # [M, N]
    ref = amx_gemm.reference(x, w)
    # both round an fp32 sum once; the sums' order differs: an ulp of the largest output
    assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16


def test_pack_is_the_b_tile_layout():
    w = torch.arange(32 * 64, dtype=torch.float32).view(32, 64).to(torch.bfloat16)  # [N, K]
    p = amx_gemm.pack(w)  # [N/16, K/32, 16 pairs, 16 n, 2]
    assert p.shape == (2, 2, 16, 16, 2)
    for nb, kb, pair, n, j in [(0, 0, 0, 0, 0), (1, 0, 3, 5, 1), (1, 1, 15, 15, 1)]:
        assert p[nb, kb, pair, n, j] == w[16 * nb + n, 32 * kb + 2 * pair + j]


def test_amx_gemm_rejects_what_it_cannot_take():
    fn = amx_gemm.kernel()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = amx_gemm.pack(torch.randn(16, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="expected"):
        fn(torch.randn(4, 32, dtype=torch.bfloat16), w)  # K does not match the tiles
    with pytest.raises(RuntimeError, match="bf16"):
        fn(x.float(), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        fn(torch.randn(64, 4, dtype=torch.bfloat16).T, w)
    bf = torch.bfloat16
    with torch.inference_mode():  # cpu_linear's choice: what the kernel can take
        assert not use_amx(torch.randn(2, 64, dtype=bf))  # 1-2 rows: the GEMV
        assert not use_amx(torch.randn(4, 40, dtype=bf))  # K % 32
        assert not use_amx(torch.randn(4, 64, dtype=bf), torch.randn(20, 64, dtype=bf))  # N % 16
        assert not use_amx(torch.randn(4, 64))  # fp32
        assert not use_amx(torch.randn(64, 4, dtype=bf).T)  # not contiguous
        assert use_amx(torch.randn(1, 5, 64, dtype=bf), torch.randn(32, 64, dtype=bf))
    assert not use_amx(torch.randn(4, 64, dtype=bf))  # grad mode: training keeps F.linear


def _dense_amx(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The AMX GEMM over a dense bf16 weight [n, K] (padded to whole 16-output tiles)."""
    n = dense.shape[0]
    return amx_gemm.kernel()(x, amx_gemm.pack(F.pad(dense, (0, 0, 0, -n % 16))))[:, :n]


@pytest.mark.parametrize("rows", [3, 17, 40])
@pytest.mark.parametrize("group", [32, 64, 0], ids=["g32", "g64", "row"])
@pytest.mark.parametrize("n", [48, 37])
def test_amx_over_int8_pack_equals_its_dense_copy(rows, group, n):
    g = torch.Generator().manual_seed(rows * 3 + n + group)
    w = torch.randn(n, 128, generator=g)
    q, sc = quantize_int8(w, None, group) if group else quantize_int8(w)
    kw, ks = cpu_kernel.pack_int8(q, sc.float().reshape(n, -1))
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    got = amx_gemm.int8_kernel()(x, kw, ks, n)  # [rows, n]
    dense = dequantize_int8(*cpu_kernel.unpack_int8(kw, ks, n)).to(torch.bfloat16)
    assert got.shape == (rows, n) and torch.equal(got, _dense_amx(x, dense))


@pytest.mark.parametrize("rows", [3, 17, 40])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("n", [48, 37])
def test_amx_over_int4_pack_equals_its_dense_copy(rows, group, n):
    g = torch.Generator().manual_seed(rows * 5 + n + group)
    w = torch.randn(n, 128, generator=g)
    kw, ks = cpu_kernel.pack_int4(*quantize_int4(w, group))
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    got = amx_gemm.int4_kernel()(x, kw, ks, n)  # [rows, n]
    dense = cpu_kernel.dequantize_int4_pack(kw, ks, n).to(torch.bfloat16)
    assert got.shape == (rows, n) and torch.equal(got, _dense_amx(x, dense))


def test_amx_over_packs_rejects_what_it_cannot_take():
    q, sc = quantize_int8(torch.randn(32, 64))
    kw, ks = cpu_kernel.pack_int8(q, sc.float().reshape(32, -1))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="matching"):
        amx_gemm.int8_kernel()(torch.randn(4, 32, dtype=torch.bfloat16), kw, ks, 32)
    with pytest.raises(RuntimeError, match="n does not match"):
        amx_gemm.int8_kernel()(x, kw, ks, 12)
    with pytest.raises(RuntimeError, match="int4 pack"):
        amx_gemm.int4_kernel()(x, kw, ks, 32)  # an int8 pack is not an int4 one
