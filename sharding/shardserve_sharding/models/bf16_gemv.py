"""A bf16 GEMV for decode steps of 1-4 rows: y = x @ w.T with AVX512-BF16 dot products.

At a few rows a decode GEMM only streams its weight once; oneDNN's packed bf16 GEMM
(cpu_gemm.packed_bf16) then spends ~15-20 us of set-up per call even for a weight that fits in
L2 (576 x 576 at 1 row: 21 us), and a SmolLM2 step makes 121 such calls. This kernel reads the
weight in its own row-major layout (no packed copy), 16 output rows at a time: each row's dot
products with the M input rows are `vdpbf16ps` (exact bf16 products, fp32 sums), and the 16 x M
horizontal sums are one transpose-add tree per input row; outputs are rounded once to bf16, as
oneDNN's are (its fp32 sums run in another order, so the two agree to an ulp, not bit for bit).
Threads split the output tiles (at::parallel_for, torch's intra-op threads).

Only where the CPU has AVX512-BF16 (the build needs `__AVX512BF16__` under -march=native; the
source does not compile without it, and `kernel()` is then None), K a multiple of 32 and N of
16 (`fits`). SHARDSERVE_BF16_GEMV=0 turns it off. Built like the other kernels
(models/native_build.py); `reference` is the plain-torch computation the tests compare with.
"""

from __future__ import annotations

import os
import threading

import torch

from . import native_build

MAX_ROWS = 2
"""Most rows cpu_linear sends to the kernel (which takes up to 4). One thread, SmolLM2's 121
GEMMs of a step, weights streamed from memory (2026-12-06, shared machine): 1 row 17.5 ms
against oneDNN packed 22.9; 2 rows 19.4 / 21.3; 4 rows 27.2 / 25.0 (four input rows' loads per
weight vector outrun the loads' ports)."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#if !defined(__AVX512BF16__)
#error "bf16 GEMV needs AVX512-BF16"
#endif

""" + native_build.AVX512_HSUM16 + r"""
constexpr int64_t PF_ROWS = 8;  // weight rows ahead that each row's loop prefetches

// Output tiles t0..t1 (16 rows of w each): y[m, 16t + i] = x[m] . w[16t + i], M input rows.
template <int M>
static void tiles(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K,
                  int64_t N, int64_t t0, int64_t t1) {
  const int64_t KC = K / 32;  // 512-bit vectors of 32 bf16 in a row
  __m512 part[M][16];
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < 16; ++i) {
      const at::BFloat16* wr = w + (t * 16 + i) * K;
      const char* ahead = reinterpret_cast<const char*>(wr + PF_ROWS * K);
      if (t * 16 + i + PF_ROWS < N)
        for (int64_t b = 0; b < K * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      __m512 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t c = 0; c < KC; ++c) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + 32 * c);
        for (int m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + 32 * c),
                                    wv);
      }
      for (int m = 0; m < M; ++m) part[m][i] = acc[m];
    }
    for (int m = 0; m < M; ++m)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + t * 16),
                          (__m256i)_mm512_cvtneps_pbh(hsum16(part[m])));
  }
}

// x [M, K] bf16 (1 <= M <= 4), w [N, K] bf16, both contiguous; K % 32 == 0, N % 16 == 0
// -> y [M, N] bf16.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "x [M, K], w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16 x and w expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous x and w expected");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 4 && K % 32 == 0 && N % 16 == 0 && K > 0,
              "1-4 rows, K a multiple of 32 and N of 16 expected");
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  // grain: ~64 KB of weight per task at least, so small layers are not split too finely
  const int64_t grain = std::max<int64_t>(1, 65536 / (16 * K * 2));
  at::parallel_for(0, N / 16, grain, [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: tiles<1>(xp, wp, yp, K, N, b, e); break;
      case 2: tiles<2>(xp, wp, yp, K, N, b, e); break;
      case 3: tiles<3>(xp, wp, yp, K, N, b, e); break;
      default: tiles<4>(xp, wp, yp, K, N, b, e); break;
    }
  });
  return y;
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def kernel():
    """`gemv_bf16(x [M, K], w [N, K]) -> [M, N]`, or None (SHARDSERVE_BF16_GEMV=0, no
    AVX512-BF16, or no compiler)."""
    if "fn" in _STATE:  # built (or refused) already: no lock on the per-GEMM path
        return _STATE["fn"]
    with _LOCK:
        if "fn" not in _STATE:
            fn = None
            if (os.environ.get("SHARDSERVE_BF16_GEMV", "1") != "0"
                    and "avx512_bf16" in native_build.cpu_flags()):
                mod = native_build.build("shardserve_bf16_gemv", _SOURCE, ["gemv_bf16"],
                                         cflags=["-O3", "-march=native"],
                                         what="bf16 GEMV kernel (oneDNN's packed GEMM)")
                fn = None if mod is None else mod.gemv_bf16
            _STATE["fn"] = fn
        return _STATE["fn"]


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., K] @ weight.T can take the kernel: at most MAX_ROWS rows, K a multiple
    of 32, N of 16, contiguous (dtype and device are the caller's test)."""
    k = x.shape[-1]
    return (x.numel() <= MAX_ROWS * k and k % 32 == 0 and weight.shape[0] % 16 == 0
            and x.is_contiguous() and weight.is_contiguous())


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight.T through the kernel (which must be built and `fits`) -> [..., N]."""
    y = _STATE["fn"](x.view(-1, x.shape[-1]), weight)  # [M, N]
    return y.view(*x.shape[:-1], weight.shape[0])


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's computation in plain torch: fp32 sums of bf16 products, rounded once."""
    return (x.float() @ weight.float().T).to(x.dtype)
