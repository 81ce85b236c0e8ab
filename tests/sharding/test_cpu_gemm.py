"""cpu_gemm.cpu_linear's per-call choice, as the model's and the TP code's linear layers reach
it: which kernel runs for which row count (packed bf16 for few rows where bf16 is native),
results equal to F.linear, and the cached packed weight following weight changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve_sharding.models import amx_gemm, bf16_gemv, cpu_gemm
from shardserve_sharding.models.llama import Linear
from shardserve_sharding.tp.comm import ThreadGroup
from shardserve_sharding.tp.layers import ColumnParallelLinear, RowParallelLinear

needs_packed = pytest.mark.skipif(
    not (cpu_gemm.PACKED_BF16 and cpu_gemm._PACKED_ROWS_LIMIT is not None),
    reason="no native bf16 here, or SHARDSERVE_PACKED_BF16 set to 0 or 1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def _layers() -> list[torch.nn.Module]:
    comm = ThreadGroup(1).comm(0)
    torch.manual_seed(0)
    layers = [Linear(64, 96, bias=True), ColumnParallelLinear(64, 96, comm, bias=True),
              RowParallelLinear(64, 96, comm, bias=True)]
    for m in layers[1:]:
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    return [m.to(torch.bfloat16) for m in layers]


@needs_packed
@pytest.mark.parametrize("rows", [1, 3, cpu_gemm.PACKED_BF16_MAX_ROWS,
                                  cpu_gemm.PACKED_BF16_MAX_ROWS + 1, 32])
def test_packed_kernel_for_few_rows_only(rows: int, monkeypatch) -> None:
    calls, gemv = [], []
    real = cpu_gemm._packed_linear
    monkeypatch.setattr(cpu_gemm, "_packed_linear", lambda *a: calls.append(1) or real(*a))
    real_gemv = bf16_gemv.gemv
    monkeypatch.setattr(bf16_gemv, "gemv", lambda *a: gemv.append(1) or real_gemv(*a))
    amx = []
    real_amx = amx_gemm.linear
    monkeypatch.setattr(amx_gemm, "linear", lambda *a: amx.append(1) or real_amx(*a))
    for lin in _layers():
        x = torch.randn(1, rows, 64).bfloat16()
        with torch.inference_mode():
            got = lin(x)
        assert rel_err(got, F.linear(x, lin.weight, lin.bias)) <= 1e-2, type(lin).__name__
    # the bias-free GEMM (the row-parallel layer adds its bias after the reduction) takes the
    # bf16 GEMV at 1-2 rows and the AMX GEMM from 3 rows where they are built; the others
    # of few rows the packed copy
    few = rows <= cpu_gemm.PACKED_BF16_MAX_ROWS
    use_gemv = rows <= bf16_gemv.MAX_ROWS and bf16_gemv.kernel() is not None
    use_amx = rows >= amx_gemm.MIN_ROWS and amx_gemm.kernel() is not None
    assert len(gemv) == (1 if use_gemv else 0)
    assert len(amx) == (1 if use_amx else 0)
    assert len(calls) == (2 if few else 0) + (1 if few and not use_gemv and not use_amx else 0)
    calls.clear()  # grad mode on (training) never takes the packed copy
    lin = _layers()[0]
    lin(torch.randn(1, 64).bfloat16()).sum().backward()
    assert calls == [] and lin.weight.grad is not None


@needs_packed
@pytest.mark.parametrize("rows, bias", [(2, True), (8, False)])  # oneDNN's copy, AMX's
def test_packed_copy_follows_weight_changes(rows: int, bias: bool) -> None:
    """The cached copy (oneDNN's packed one for a biased 2-row GEMM; the AMX GEMM's for a
    bias-free 8-row one where it is built) is rebuilt when the weight changes in place or is
    swapped."""
    lin = _layers()[0]
    if not bias:
        lin.bias = None
    x = torch.randn(rows, 64).bfloat16()
    with torch.inference_mode():
        lin(x)
    slot = "_bf16_packed" if bias or amx_gemm.kernel() is None else "_amx_packed"
    assert slot in lin.__dict__  # the path under test took its copy
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: the version counter moves
    with torch.inference_mode():
        assert rel_err(lin(x), F.linear(x, lin.weight, lin.bias)) <= 1e-2
    lin.weight.data = torch.randn(96, 64).bfloat16()  # same version, new storage
    with torch.inference_mode():
        assert rel_err(lin(x), F.linear(x, lin.weight, lin.bias)) <= 1e-2


def test_fp32_and_bias_free_layers_are_plain_linear() -> None:
    comm = ThreadGroup(1).comm(0)
    for lin in (Linear(64, 96, bias=False), ColumnParallelLinear(64, 96, comm),
                RowParallelLinear(64, 96, comm)):
        torch.nn.init.normal_(lin.weight)
        x = torch.randn(5, 64)
        with torch.inference_mode():
            assert torch.allclose(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
