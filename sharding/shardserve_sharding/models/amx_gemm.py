"""A bf16 GEMM on AMX tiles for steps of 3 rows or more: y = x @ w.T.

A decode step of a few rows streams each weight once, and oneDNN's packed bf16 GEMM
(cpu_gemm.packed_bf16) spends ~20-30 us of set-up and thread hand-off per call around it: at
32 rows SmolLM2's 121 GEMMs of a step took 14.4 ms over weights streamed from memory, 0.5-0.85
TFLOP/s even with the weights hot. This kernel keeps its own copy of each weight in AMX's
B-tile layout (`pack`: [N/16, K/32, 16, 16, 2], pairs of K side by side, one 1 KB tile per 16
outputs x 32 inputs, a row of tiles contiguous), and each task computes 32 outputs (two B
tiles) for 32 input rows (two A tiles read in place from x) into four fp32 accumulator tiles
with `tdpbf16ps` (exact bf16 products, fp32 sums), prefetching the weight tiles 4 ahead; more
rows loop over 32-row blocks with the task's weights then in L2. Outputs are rounded once to
bf16, as oneDNN's are (the fp32 sums run in another order: the two agree to an ulp, not bit
for bit). Threads split the output tiles (at::parallel_for, torch's intra-op threads); each
loads its tile configuration and releases the tiles when done.

Measured (2 threads, quiet 2-vCPU Xeon with AMX, 2026-12-06; SmolLM2's 121 GEMMs of a step, 30
layers' weights streamed from memory): 32 rows 9.5 ms against oneDNN packed 14.4; 16 rows 8.4
/ 11.7; 8 rows 8.7 / 11.0; 4 rows 8.5 / 10.7 (loadtest/results/engine.md section 9). At 1-2 rows
the bf16 GEMV (models/bf16_gemv.py) reads the plain weight and stays in front.

Only where the CPU has AMX-BF16 (`kernel()` is None otherwise, or where the kernel cannot be
built, or Linux refuses the tile state: arch_prctl(ARCH_REQ_XCOMP_PERM)), K a multiple of 32
and N of 16 (`fits`). SHARDSERVE_AMX_GEMM=0 turns it off. `reference` is the plain-torch
computation the tests compare with.
"""

from __future__ import annotations

import os
import threading

import torch

from . import native_build

MIN_ROWS = 3
"""Fewest rows cpu_linear sends here (1-2 rows: the bf16 GEMV, over the plain weight). There is
no most: over 30 layers' weights streamed from memory, 2 threads, SmolLM2's layer GEMMs took
(ms, this kernel / oneDNN packed / F.linear) 9.3 / 11.5 / 17.8 at 64 rows, 23.8 / 27.0 / 33.8
at 256, 47.8 / 55.2 / 52.6 at 512, 98.8 / 105.9 / 102.5 at 1024 (engine.md section 9)."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(__AVX512BF16__)
#error "the AMX GEMM needs AMX-TILE, AMX-BF16 and AVX512-BF16"
#endif

// Linux hands out the AMX tile state only on request (once per process).
static bool tiles_allowed() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

bool available() { return tiles_allowed(); }

struct TileConfig {  // palette 1: tiles 0-3 accumulators, 4-5 x, 6-7 weights; 16 x 64 B each
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

constexpr int64_t PF = 4;  // weight tiles ahead that the loop prefetches

// Tasks i0..i1: outputs 32i .. 32i+31 (tiles n0 = 2i and n0 + 1, if N has it) for all Mp rows
// of xp ([Mp, K], Mp a multiple of 16, rows past M zero), written to y [M, N].
static void tasks(const at::BFloat16* xp, const at::BFloat16* wp, at::BFloat16* y, int64_t M,
                  int64_t Mp, int64_t K, int64_t N, int64_t i0, int64_t i1) {
  const int64_t NB = N / 16, KB = K / 32;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float buf[16 * 16];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n0 = 2 * i;
    const bool two = n0 + 1 < NB;
    const at::BFloat16* w0 = wp + n0 * KB * 512;  // [KB, 16, 16, 2]: tile kb at 512 kb
    const at::BFloat16* w1 = w0 + KB * 512;
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
      const bool m2 = m0 + 16 < Mp;
      const at::BFloat16* x0 = xp + m0 * K;
      const at::BFloat16* x1 = x0 + 16 * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < KB; ++kb) {
        if (m0 == 0 && kb + PF < KB) {  // first pass: the weights come from memory
          const char* a = reinterpret_cast<const char*>(w0 + (kb + PF) * 512);
          const char* b = reinterpret_cast<const char*>(w1 + (kb + PF) * 512);
          for (int c = 0; c < 1024; c += 64) {
            _mm_prefetch(a + c, _MM_HINT_T0);
            if (two) _mm_prefetch(b + c, _MM_HINT_T0);
          }
        }
        _tile_loadd(4, x0 + kb * 32, K * 2);
        _tile_loadd(6, w0 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (m2) {
          _tile_loadd(5, x1 + kb * 32, K * 2);
          _tile_dpbf16ps(2, 5, 6);
        }
        if (two) {
          _tile_loadd(7, w1 + kb * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          if (m2) _tile_dpbf16ps(3, 5, 7);
        }
      }
      // accumulators -> bf16 rows of y (rows past M are padding: not written)
      for (int q = 0; q < 4; ++q) {
        const int64_t mb = m0 + 16 * (q / 2), nb = n0 + q % 2;
        if ((q % 2 && !two) || (q / 2 && !m2)) continue;
        switch (q) {
          case 0: _tile_stored(0, buf, 64); break;
          case 1: _tile_stored(1, buf, 64); break;
          case 2: _tile_stored(2, buf, 64); break;
          default: _tile_stored(3, buf, 64); break;
        }
        for (int64_t r = 0; r < 16 && mb + r < M; ++r)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (mb + r) * N + nb * 16),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(buf + r * 16)));
      }
    }
  }
  _tile_release();
}

// x [M, K] bf16 contiguous, wp [N/16, K/32, 16, 16, 2] bf16 (`pack`) -> y [M, N] bf16.
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor wp) {
  TORCH_CHECK(tiles_allowed(), "the kernel may not use AMX tiles here");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 5 && wp.size(2) == 16 && wp.size(3) == 16 &&
              wp.size(4) == 2 && x.size(1) == wp.size(1) * 32,
              "x [M, K], packed weight [N/16, K/32, 16, 16, 2] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16,
              "bf16 x and weight expected");
  TORCH_CHECK(x.is_contiguous() && wp.is_contiguous(), "contiguous x and weight expected");
  const int64_t M = x.size(0), K = x.size(1), N = wp.size(0) * 16;
  TORCH_CHECK(M >= 1 && K > 0, "at least one row expected");
  auto y = torch::empty({M, N}, x.options());
  const int64_t Mp = (M + 15) / 16 * 16;
  auto xp = x;
  if (Mp != M) {  // tiles read 16 rows: pad with zero rows
    xp = torch::zeros({Mp, K}, x.options());
    xp.narrow(0, 0, M).copy_(x);
  }
  const auto* xd = xp.data_ptr<at::BFloat16>();
  const auto* wd = wp.data_ptr<at::BFloat16>();
  auto* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N / 16 + 1) / 2, 1, [&](int64_t b, int64_t e) {
    tasks(xd, wd, yd, M, Mp, K, N, b, e);
  });
  return y;
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def kernel():
    """`amx_linear(x [M, K], packed [N/16, K/32, 16, 16, 2]) -> [M, N]`, or None
    (SHARDSERVE_AMX_GEMM=0, no AMX-BF16, no compiler, or no tile state from the OS)."""
    if "fn" in _STATE:  # built (or refused) already: no lock on the per-GEMM path
        return _STATE["fn"]
    with _LOCK:
        if "fn" not in _STATE:
            fn = None
            flags = native_build.cpu_flags()
            if (os.environ.get("SHARDSERVE_AMX_GEMM", "1") != "0"
                    and {"amx_bf16", "amx_tile", "avx512_bf16"} <= flags):
                mod = native_build.build("shardserve_amx_gemm", _SOURCE,
                                         ["amx_linear", "available"],
                                         cflags=["-O3", "-march=native"],
                                         what="AMX bf16 GEMM (oneDNN's packed GEMM)")
                fn = mod.amx_linear if mod is not None and mod.available() else None
            _STATE["fn"] = fn
        return _STATE["fn"]


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bf16 -> [N/16, K/32, 16, 16, 2]: per tile of 16 outputs x 32 inputs, the
    16 pairs of inputs (rows) x 16 outputs (columns) x the pair, AMX's B-tile layout."""
    n, k = weight.shape
    return (weight.reshape(n // 16, 16, k // 32, 16, 2)  # [NB, 16 n, KB, 16 pairs, 2]
            .permute(0, 2, 3, 1, 4).contiguous())  # [NB, KB, 16 pairs, 16 n, 2]


def fits_rows(x: torch.Tensor) -> bool:
    """x [..., K]'s side of `fits`: MIN_ROWS rows or more, K a multiple of 32, contiguous."""
    k = x.shape[-1]
    return x.numel() >= MIN_ROWS * k and k % 32 == 0 and x.is_contiguous()


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., K] @ weight.T can take the kernel: `fits_rows`, and N a multiple of 16
    (dtype and device are the caller's test)."""
    return fits_rows(x) and weight.shape[0] % 16 == 0


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W.T through the kernel (built, and `fits`), packed = pack(W) -> [..., N]."""
    y = _STATE["fn"](x.view(-1, x.shape[-1]), packed)  # [M, N]
    return y.view(*x.shape[:-1], packed.shape[0] * 16)


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's computation in plain torch: fp32 sums of bf16 products, rounded once."""
    return (x.float() @ weight.float().T).to(x.dtype)
