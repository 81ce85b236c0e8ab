"""The bf16 GEMV kernel (models/bf16_gemv.py) equals its fp32-sum reference to an ulp at every
row count it takes, 1 and 2 threads, and is what cpu_linear runs for 1-2 bf16 rows."""

from __future__ import annotations

import pytest
import torch
from torch_threads import torch_threads

from shardserve_sharding.models import bf16_gemv, cpu_gemm
from shardserve_sharding.models.llama import Linear

pytestmark = pytest.mark.skipif(bf16_gemv.kernel() is None,
                                reason="no AVX512-BF16 here (or no compiler): oneDNN's GEMM runs")


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, k", [(16, 32), (960, 576), (576, 1536), (4096, 64)])
def test_gemv_equals_reference(rows, threads, n, k):
    g = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)  # [M, K]
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)  # [N, K]
    with torch_threads(threads):
        got = bf16_gemv.kernel()(x, w)  # [M, N]
    ref = bf16_gemv.reference(x, w)
    # both round an fp32 sum once; the sums' order differs: an ulp of the largest output
    assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16


def test_gemv_rejects_what_it_cannot_take():
    x = torch.randn(1, 40, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        bf16_gemv.kernel()(x, torch.randn(16, 40, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="rows"):
        bf16_gemv.kernel()(torch.randn(5, 32, dtype=torch.bfloat16),
                           torch.randn(16, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16"):
        bf16_gemv.kernel()(torch.randn(1, 32), torch.randn(16, 32))


@pytest.mark.skipif(not cpu_gemm.PACKED_BF16, reason="bf16 is not native here")
def test_cpu_linear_takes_the_gemv_for_one_or_two_rows(monkeypatch):
    lin = Linear(64, 48, bias=False).to(torch.bfloat16)
    calls = []
    real = bf16_gemv.gemv
    monkeypatch.setattr(bf16_gemv, "gemv", lambda x, w: calls.append(x.shape) or real(x, w))
    with torch.inference_mode():
        for shape in [(1, 1, 64), (2, 1, 64), (1, 3, 64), (8, 64)]:
            x = torch.randn(*shape).to(torch.bfloat16)
            y = lin(x)
            ref = bf16_gemv.reference(x.reshape(-1, 64), lin.weight).view(*shape[:-1], 48)
            assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert calls == [(1, 1, 64), (2, 1, 64)]
