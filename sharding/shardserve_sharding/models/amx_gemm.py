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

The same loop runs over the quantized kernel's int8 and int4 copies (quant/cpu_kernel.py
pack_int8 / pack_int4; `int8_kernel`, `int4_kernel`), each weight tile dequantized into the
B-tile layout as it streams (bf16(q * scale), bf16(q * scale + min): the dense copy's values,
so the results equal the GEMM over the dense copy bit for bit). Quantized weights take it
where they keep no dense copy (SHARDSERVE_QUANT_DENSE_MIN_ROWS=0: quant/kernels.py
`_lean_amx`): the conversion costs more than the halved bytes save (SmolLM2 32-row decode
forward, 2 threads: int8-g32 17.5 ms, int4-g32 16.6, over the dense copy 16.0-16.2).

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
#include <algorithm>
#include <vector>

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

static inline void prefetch(const void* p, int bytes) {
  for (int c = 0; c < bytes; c += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + c, _MM_HINT_T0);
}

// Weight tiles in the bf16 B-tile layout, read in place: tile (nb, kb) of [N/16, K/32, 16
// pairs, 16 outputs, 2].
struct Bf16Tiles {
  static constexpr bool kDequant = false;
  const at::BFloat16* w;
  int64_t KB;
  const at::BFloat16* tile(int64_t nb, int64_t kb) const { return w + (nb * KB + kb) * 512; }
  void prefetch_tile(int64_t nb, int64_t kb) const { prefetch(tile(nb, kb), 1024); }
  void fill(int64_t, int64_t, at::BFloat16*) const {}
};

// The quantized kernel's int8 copy (quant/cpu_kernel.py pack_int8: w [N/16, K/32, 8, 16, 4]
// uint8 holding q + 128, scales [N/16, K/G, 16]), dequantized tile by tile into the bf16
// B-tile layout: w = bf16(float(q) * scale), one fp32 product rounded once, as the dense copy
// (quant/scheme.py dequantize_int8, then .to(bf16)) holds it.
template <typename S>
struct Int8Tiles {
  static constexpr bool kDequant = true;
  const uint8_t* w;
  const S* sc;
  int64_t KB, NG, G;
  void prefetch_tile(int64_t nb, int64_t kb) const { prefetch(w + (nb * KB + kb) * 512, 512); }
  static __m512 scales16(const float* s) { return _mm512_loadu_ps(s); }
  static __m512 scales16(const at::Half* s) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  }
  // out [16 pairs][16 n][2] bf16 of tile (nb, kb): pair p holds columns 2p, 2p + 1 of the
  // block, which sit in the int8 layout at [c = p / 2][n][i = 2 (p % 2) + j].
  void fill(int64_t nb, int64_t kb, at::BFloat16* out) const {
    const uint8_t* src = w + (nb * KB + kb) * 512;
    const __m512 s = scales16(sc + (nb * NG + kb * 32 / G) * 16);  // [16 n]
    const __m512 slo = _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), s);
    const __m512 shi = _mm512_permutexvar_ps(
        _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15), s);
    // per 128-bit lane (outputs n = 4L .. 4L + 3, 4 bytes each): columns i = 0, 1 of the 4
    // outputs into the low 8 bytes, i = 2, 3 into the high 8
    const __m512i shuf = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
    const __m512i evens_first = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
    const __m512i bias = _mm512_set1_epi32(128);
    for (int c = 0; c < 8; ++c) {
      __m512i v = _mm512_shuffle_epi8(_mm512_loadu_si512(src + 64 * c), shuf);
      v = _mm512_permutexvar_epi64(evens_first, v);  // low 256: pair 2c, high: pair 2c + 1
      for (int h = 0; h < 2; ++h) {
        const __m256i b = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
        const __m512i lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(b)),
                                            bias);  // n 0..7, 2 columns each
        const __m512i hi = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1)),
                                            bias);  // n 8..15
        const __m512bh row = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), shi),
                                                 _mm512_mul_ps(_mm512_cvtepi32_ps(lo), slo));
        _mm512_storeu_si512(out + (2 * c + h) * 32, (__m512i)row);
      }
    }
  }
  const at::BFloat16* tile(int64_t, int64_t) const { return nullptr; }
};

// The quantized kernel's int4 copy (quant/cpu_kernel.py pack_int4: w [N/16, K/32, 4, 16, 4]
// uint8, byte (t, n, i) holding columns 8t + i (low nibble) and 8t + 4 + i (high) as q in
// 0..15, (scale, min) [N/16, K/G, 2, 16]), dequantized tile by tile: w = bf16(q * scale +
// min), product and sum each rounded to fp32, as dequantize_int4_pack then .to(bf16).
template <typename S>
struct Int4Tiles {
  static constexpr bool kDequant = true;
  const uint8_t* w;
  const S* sc;
  int64_t KB, NG, G;
  void prefetch_tile(int64_t nb, int64_t kb) const { prefetch(w + (nb * KB + kb) * 256, 256); }
  // pair p (columns 2p, 2p + 1) sits at t = p / 4, nibble h = (p % 4) / 2, bytes
  // i = 2 (p % 2) + j
  void fill(int64_t nb, int64_t kb, at::BFloat16* out) const {
    const uint8_t* src = w + (nb * KB + kb) * 256;
    const S* g = sc + (nb * NG + kb * 32 / G) * 32;  // [2, 16]: scales, mins
    const __m512 s = Int8Tiles<S>::scales16(g), m = Int8Tiles<S>::scales16(g + 16);
    const __m512i lo_n = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i hi_n = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14,
                                           15, 15);
    const __m512 slo = _mm512_permutexvar_ps(lo_n, s), shi = _mm512_permutexvar_ps(hi_n, s);
    const __m512 mlo = _mm512_permutexvar_ps(lo_n, m), mhi = _mm512_permutexvar_ps(hi_n, m);
    const __m512i shuf = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
    const __m512i evens_first = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_shuffle_epi8(_mm512_loadu_si512(src + 64 * t), shuf);
      v = _mm512_permutexvar_epi64(evens_first, v);  // low 256: bytes i = 0, 1; high: 2, 3
      for (int q = 0; q < 4; ++q) {  // pair 4t + q: half q % 2, nibble q / 2
        __m256i b = q % 2 ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
        b = _mm256_and_si256(q / 2 ? _mm256_srli_epi16(b, 4) : b, low4);
        const __m512 flo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(b)));
        const __m512 fhi = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1)));
        const __m512bh row = _mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_mul_ps(fhi, shi), mhi),
                                                 _mm512_add_ps(_mm512_mul_ps(flo, slo), mlo));
        _mm512_storeu_si512(out + (4 * t + q) * 32, (__m512i)row);
      }
    }
  }
  const at::BFloat16* tile(int64_t, int64_t) const { return nullptr; }
};

// Tasks i0..i1: outputs 32i .. 32i+31 (tiles n0 = 2i and n0 + 1, if N has it) for all Mp rows
// of xp ([Mp, K], Mp >= 16; rows past M zero), written to y [M, N], in 16-row blocks starting
// at 16j, the last moved back to Mp - 16 (overlapping its neighbour: no copy of x to pad
// it), two blocks a pass. A dequantizing source fills the task's tiles on its first pass
// into `deq` [2, KB, 512] and later passes read them there.
template <typename Src>
static void tasks(const Src& src, const at::BFloat16* xp, at::BFloat16* y, int64_t M,
                  int64_t Mp, int64_t K, int64_t N, int64_t i0, int64_t i1) {
  const int64_t NB = N / 16, KB = K / 32, nblk = (Mp + 15) / 16;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float buf[16 * 16];
  std::vector<at::BFloat16> deq(Src::kDequant ? 2 * KB * 512 : 0);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n0 = 2 * i;
    const bool two = n0 + 1 < NB;
    for (int64_t j = 0; j < nblk; j += 2) {  // 16-row blocks j, j + 1
      const bool m2 = j + 1 < nblk;
      const int64_t s0 = std::min(16 * j, Mp - 16), s1 = std::min(16 * (j + 1), Mp - 16);
      const at::BFloat16* x0 = xp + s0 * K;
      const at::BFloat16* x1 = xp + s1 * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < KB; ++kb) {
        const at::BFloat16 *b0, *b1 = nullptr;
        if (j == 0 && kb + PF < KB) {  // first pass: the weights come from memory
          src.prefetch_tile(n0, kb + PF);
          if (two) src.prefetch_tile(n0 + 1, kb + PF);
        }
        if constexpr (Src::kDequant) {
          b0 = deq.data() + kb * 512;
          b1 = deq.data() + (KB + kb) * 512;
          if (j == 0) {
            src.fill(n0, kb, const_cast<at::BFloat16*>(b0));
            if (two) src.fill(n0 + 1, kb, const_cast<at::BFloat16*>(b1));
          }
        } else {
          b0 = src.tile(n0, kb);
          if (two) b1 = src.tile(n0 + 1, kb);
        }
        _tile_loadd(4, x0 + kb * 32, K * 2);
        _tile_loadd(6, b0, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (m2) {
          _tile_loadd(5, x1 + kb * 32, K * 2);
          _tile_dpbf16ps(2, 5, 6);
        }
        if (two) {
          _tile_loadd(7, b1, 64);
          _tile_dpbf16ps(1, 4, 7);
          if (m2) _tile_dpbf16ps(3, 5, 7);
        }
      }
      // accumulators -> bf16 rows of y (rows past M are padding: not written; a last block
      // moved back over its neighbour's rows writes them again, with the same values)
      for (int q = 0; q < 4; ++q) {
        const int64_t mb = q / 2 ? s1 : s0, nb = n0 + q % 2;
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

// x [M, K] -> (x, Mp = M) for 16 rows or more (the last block overlaps); fewer: x padded
// with zero rows to the 16 a tile reads (Mp = 16)
static torch::Tensor padded(const torch::Tensor& x, int64_t& Mp) {
  const int64_t M = x.size(0), K = x.size(1);
  Mp = std::max<int64_t>(M, 16);
  if (Mp == M) return x;
  auto xp = torch::zeros({Mp, K}, x.options());
  xp.narrow(0, 0, M).copy_(x);
  return xp;
}

static void check_x(const torch::Tensor& x) {
  TORCH_CHECK(tiles_allowed(), "the kernel may not use AMX tiles here");
  TORCH_CHECK(x.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) > 0 && x.size(1) % 32 == 0,
              "x [M, K] with K a multiple of 32 expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "contiguous bf16 x expected");
}

// y [M, N] = x [M, K] @ W.T over the weight tiles of `src` (N / 16 tiles of 16 outputs).
template <typename Src>
static torch::Tensor run_tasks(const Src& src, const torch::Tensor& x, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  int64_t Mp;
  auto xp = padded(x, Mp);
  auto y = torch::empty({M, N}, x.options());
  const auto* xd = xp.data_ptr<at::BFloat16>();
  auto* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N / 16 + 1) / 2, 1, [&](int64_t b, int64_t e) {
    tasks(src, xd, yd, M, Mp, K, N, b, e);
  });
  return y;
}

// x [M, K] bf16 contiguous, wp [N/16, K/32, 16, 16, 2] bf16 (`pack`) -> y [M, N] bf16.
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor wp) {
  check_x(x);
  TORCH_CHECK(wp.dim() == 5 && wp.size(2) == 16 && wp.size(3) == 16 && wp.size(4) == 2 &&
              x.size(1) == wp.size(1) * 32,
              "packed weight [N/16, K/32, 16, 16, 2] matching x [M, K] expected");
  TORCH_CHECK(wp.scalar_type() == at::kBFloat16 && wp.is_contiguous() && wp.device().is_cpu(),
              "contiguous bf16 CPU weight expected");
  return run_tasks(Bf16Tiles{wp.data_ptr<at::BFloat16>(), x.size(1) / 32}, x, wp.size(0) * 16);
}

// The int8 / int4 packs' shared part (their shapes checked by the caller): w [NT, ...] uint8,
// sc [NT, K/G, ...] fp16 or fp32 -> y [M, n] (outputs past n are the pack's padding).
template <template <typename> class Tiles>
static torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& w,
                                  const torch::Tensor& sc, int64_t n) {
  const int64_t K = x.size(1), NT = w.size(0), NG = sc.size(1);
  TORCH_CHECK(sc.size(0) == NT && NG > 0 && K % NG == 0 && (K / NG) % 32 == 0 &&
              sc.is_contiguous(), "scales [NT, K/G, ...] with G a multiple of 32 expected");
  TORCH_CHECK(n > 16 * NT - 16 && n <= 16 * NT, "n does not match the pack");
  TORCH_CHECK(w.device().is_cpu() && sc.device().is_cpu(), "CPU tensors expected");
  const int64_t N = 16 * NT, G = K / NG;
  torch::Tensor y;
  if (sc.scalar_type() == at::kHalf)
    y = run_tasks(Tiles<at::Half>{w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), K / 32, NG, G},
                  x, N);
  else if (sc.scalar_type() == at::kFloat)
    y = run_tasks(Tiles<float>{w.data_ptr<uint8_t>(), sc.data_ptr<float>(), K / 32, NG, G}, x, N);
  else
    TORCH_CHECK(false, "scales must be half or float");
  return n == N ? y : y.narrow(1, 0, n).contiguous();
}

// x [M, K] bf16 contiguous, w [NT, K/32, 8, 16, 4] uint8 (q + 128), sc [NT, K/G, 16] fp16 or
// fp32 (quant/cpu_kernel.py pack_int8) -> y [M, n] bf16.
torch::Tensor amx_int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor sc, int64_t n) {
  check_x(x);
  TORCH_CHECK(w.dim() == 5 && w.size(1) * 32 == x.size(1) && w.size(2) == 8 &&
              w.size(3) == 16 && w.size(4) == 4 && w.scalar_type() == at::kByte &&
              w.is_contiguous(), "int8 pack [NT, K/32, 8, 16, 4] uint8 matching x [M, K] expected");
  TORCH_CHECK(sc.dim() == 3 && sc.size(2) == 16, "int8 scales [NT, K/G, 16] expected");
  return quant_linear<Int8Tiles>(x, w, sc, n);
}

// x [M, K] bf16 contiguous, w [NT, K/32, 4, 16, 4] uint8, sc [NT, K/G, 2, 16] fp16 or fp32
// (quant/cpu_kernel.py pack_int4) -> y [M, n] bf16.
torch::Tensor amx_int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor sc, int64_t n) {
  check_x(x);
  TORCH_CHECK(w.dim() == 5 && w.size(1) * 32 == x.size(1) && w.size(2) == 4 &&
              w.size(3) == 16 && w.size(4) == 4 && w.scalar_type() == at::kByte &&
              w.is_contiguous(), "int4 pack [NT, K/32, 4, 16, 4] uint8 matching x [M, K] expected");
  TORCH_CHECK(sc.dim() == 4 && sc.size(2) == 2 && sc.size(3) == 16,
              "int4 scales [NT, K/G, 2, 16] expected");
  return quant_linear<Int4Tiles>(x, w, sc, n);
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _module():
    """The built extension, or None (SHARDSERVE_AMX_GEMM=0, no AMX-BF16, no compiler, or no
    tile state from the OS)."""
    if "mod" in _STATE:  # built (or refused) already: no lock on the per-GEMM path
        return _STATE["mod"]
    with _LOCK:
        if "mod" not in _STATE:
            mod = None
            flags = native_build.cpu_flags()
            if (os.environ.get("SHARDSERVE_AMX_GEMM", "1") != "0"
                    and {"amx_bf16", "amx_tile", "avx512_bf16"} <= flags):
                mod = native_build.build("shardserve_amx_gemm", _SOURCE,
                                         ["amx_linear", "amx_int8_linear", "amx_int4_linear",
                                          "available"],
                                         cflags=["-O3", "-march=native", "-ffp-contract=off"],
                                         what="AMX bf16 GEMM (oneDNN's packed GEMM)")
                if mod is not None and not mod.available():
                    mod = None
            # "fn" first: the lock-free path reads "mod", and linear() then "fn"
            _STATE["fn"] = None if mod is None else mod.amx_linear
            _STATE["mod"] = mod
        return _STATE["mod"]


def kernel():
    """`amx_linear(x [M, K], packed [N/16, K/32, 16, 16, 2]) -> [M, N]`, or None (see
    `_module`)."""
    mod = _module()
    return None if mod is None else mod.amx_linear


def int8_kernel():
    """`amx_int8_linear(x [M, K], w, sc, n) -> [M, n]` over the quantized kernel's int8 pack
    (quant/cpu_kernel.py pack_int8), dequantizing each weight tile as it streams, or None."""
    mod = _module()
    return None if mod is None else mod.amx_int8_linear


def int4_kernel():
    """`amx_int4_linear(x [M, K], w, sc, n) -> [M, n]` over the quantized kernel's int4 pack
    (quant/cpu_kernel.py pack_int4), dequantizing each weight tile as it streams, or None."""
    mod = _module()
    return None if mod is None else mod.amx_int4_linear


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bf16 -> [N/16, K/32, 16, 16, 2]: per tile of 16 outputs x 32 inputs, the
    16 pairs of inputs (rows) x 16 outputs (columns) x the pair, AMX's B-tile layout."""
    n, k = weight.shape
    return (weight.reshape(n // 16, 16, k // 32, 16, 2)  # [NB, 16 n, KB, 16 pairs, 2]
            .permute(0, 2, 3, 1, 4).contiguous())  # [NB, KB, 16 pairs, 16 n, 2]


def fits_rows(x: torch.Tensor) -> bool:
    """Whether x [..., K] can take the kernel: MIN_ROWS rows or more, K a multiple of 32,
    contiguous (the weight's side: N a multiple of 16; dtype and device are the caller's
    test, cpu_gemm.use_amx)."""
    k = x.shape[-1]
    return x.numel() >= MIN_ROWS * k and k % 32 == 0 and x.is_contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W.T through the kernel (built, and `fits`), packed = pack(W) -> [..., N]."""
    y = _STATE["fn"](x.view(-1, x.shape[-1]), packed)  # [M, N]
    return y.view(*x.shape[:-1], packed.shape[0] * 16)


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's computation in plain torch: fp32 sums of bf16 products, rounded once."""
    return (x.float() @ weight.float().T).to(x.dtype)
