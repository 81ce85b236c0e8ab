"""The C++ kernels build wherever they can: each kernel's own tests skip when it is absent, so a
source that stops compiling would otherwise pass as "not built here". With a C++ compiler and
no opt-out variable, the decode attention and fused-op kernels must build, and the quantized
GEMV kernel too on a CPU with AVX2, FMA and F16C (its widest path there, and the forced builds)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shardserve_server.engine import decode_attention
from shardserve_sharding.models import bf16_gemv, fused_ops
from shardserve_sharding.quant import cpu_kernel


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler here: the kernels fall back")


@needs_compiler
@pytest.mark.parametrize("env, built", [
    ("SHARDSERVE_DECODE_KERNEL", decode_attention.kernel),
    ("SHARDSERVE_DECODE_KERNEL", decode_attention.step_kernel),
    ("SHARDSERVE_FUSED_OPS", fused_ops.kernels),
])
def test_portable_kernels_build(env, built):
    if os.environ.get(env) == "0":
        pytest.skip(f"{env}=0")
    assert built() is not None, f"the kernel did not build (see the warning logged by {env})"


@needs_compiler
def test_quant_kernel_builds_where_the_cpu_has_avx2():
    """The native build runs the widest path the CPU has; the forced 256-bit builds build
    where the CPU has their flags."""
    if os.environ.get("SHARDSERVE_QUANT_KERNEL") == "0":
        pytest.skip("SHARDSERVE_QUANT_KERNEL=0")
    flags = _cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("no AVX2 here: torch's int8/int4 ops run")
    mod = cpu_kernel.kernel("native")
    assert mod is not None
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        assert mod.isa() == "avx512-vnni"
    else:
        assert mod.isa() == ("avx-vnni" if "avx_vnni" in flags else "avx2")
    assert cpu_kernel.kernel("avx2").isa() == "avx2"
    if "avx_vnni" in flags:
        assert cpu_kernel.kernel("avx-vnni").isa() == "avx-vnni"


@needs_compiler
def test_bf16_gemv_builds_where_the_cpu_has_avx512_bf16():
    if os.environ.get("SHARDSERVE_BF16_GEMV") == "0":
        pytest.skip("SHARDSERVE_BF16_GEMV=0")
    if "avx512_bf16" not in _cpu_flags():
        pytest.skip("no AVX512-BF16 here: oneDNN's GEMM runs")
    assert bf16_gemv.kernel() is not None
