"""Weight-only int4 / int8 GEMV and small GEMM for decode (few rows), AVX512-VNNI / AVX2 in C++.

A decode step at batch 1 is bound by the bytes of weight it streams. This kernel reads each
weight byte once per call and does the dot products in int8, as llama.cpp's Q4_1 x Q8_1 and
Q8_0 x Q8_0 paths do:

- each activation row is quantized per block of 32 columns to int8 (a = round(x * 127 /
  max|x|), block scale da = max|x| / 127), and the block's exact fp32 sum sx is kept;
- weights are repacked once at load (never stored: the checkpoint keeps its own format) so that
  one `vpdpbusd` multiplies 16 output rows x 4 columns of unsigned weight bytes by 4 broadcast
  activation bytes: tiles of 16 output rows, each block of 32 columns one contiguous run
  (int4: 4 x 64 bytes, low / high nibbles feeding two dpbusd each; int8: 8 x 64 bytes);
- int4 (w = v * scale + offset, q = v + 8 in [0, 15] unsigned in the dpbusd): per block
  y += scale * da * (dot(q, a) - 8 sum(a)) + offset * sx, so the activation's rounding error
  scales with |v * scale| (the weight's distance from its group's midpoint), not with |q *
  scale|; the tile's (scale, min = offset - 8 scale) per group sit next to each other in fp16
  (exact for GGUF-born Q4_1 blocks, whose d and m they are; fp32 where fp16 cannot hold them),
  offset = min + 8 scale is formed in fp32 in registers;
- int8 (w = q * scale, one scale per group of G columns, G = K for row scales): the weight is
  stored as q + 128 (unsigned), so per block y += scale * da * (dot(q + 128, a) - 128 *
  sum(a)); the tile's 16 scales per group sit together in fp16 (grouped scales are fp16
  values, quant/scheme.py) or fp32 (row scales).

Rows are computed in chunks of up to 8 (every chunk shares each tile's weight loads), tiles of
16 output rows run in parallel (at::parallel_for, torch's intra-op threads). The only
approximation besides fp32 summation order is the activation's int8 rounding (relative error
about 0.4% of a block's max, the size of bf16's own rounding); `reference` computes the same
thing in plain torch (float64) for the tests.

Code paths, chosen by the build's CPU flags (`-march=native`, so per CPU kind): AVX512F/BW +
AVX512-VNNI (the above); else AVX2 + FMA + F16C on 256-bit registers, each 16-row tile as two
halves of 8 rows over the same packing, with AVX-VNNI's `vpdpbusd` where the CPU has it, and
without it `vpmaddubsw` + `vpmaddwd` (int4: the unsigned nibbles times signed activation
bytes cannot saturate int16; int8: |q| times sign(a, q), as llama.cpp's Q8_0 AVX2 path). The
result is the same up to fp32 summation order. SHARDSERVE_QUANT_ISA=avx2 / avx-vnni forces a
256-bit build (to test and time it on an AVX-512 CPU). Without AVX2, without a compiler, or
with SHARDSERVE_QUANT_KERNEL=0, `kernel()` is None and quant/kernels.py keeps torch's
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`. Built once per CPU kind
(models/native_build.py; .ci/setup builds it next to the other native kernels).
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F

from ..models import native_build

BLOCK = 32
"""Activation block: columns sharing one int8 scale (the int4 group is a multiple of it)."""
TILE = 16
"""Output rows per tile (one zmm of int32 / fp32 lanes)."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define QK_AVX512 1
#define QK_ANY 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_AVX2 1
#define QK_ANY 1
#endif

// The code path this build runs: "avx512-vnni", "avx-vnni" (AVX2 with the 256-bit dpbusd),
// "avx2" (dpbusd emulated by maddubs + madd), or "" (none: the caller keeps torch's ops).
std::string isa() {
#if defined(QK_AVX512)
  return "avx512-vnni";
#elif defined(QK_AVX2) && defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(QK_AVX2)
  return "avx2";
#else
  return "";
#endif
}

bool available() { return !isa().empty(); }

// x [M, K] -> per 32-column block (K a multiple of 32) two int8 digits a [M, K/32, 2, 32]:
// x ~= step * (256 a1 + a2) with step = max|x| / 127 / 256, a1 = round(x / (256 step)), a2 =
// round((x - 256 step a1) / step) (clamped to +-127); ds = step, sx = sum x (fp32), sa = 256
// sum a1 + sum a2.
template <typename T>
static void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* a, float* ds, float* sx,
                          int32_t* sa) {
  const int64_t KB = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t kb = 0; kb < KB; ++kb) {
      float v[32], amax = 0.f, s = 0.f;
      for (int i = 0; i < 32; ++i) {
        v[i] = static_cast<float>(x[m * K + kb * 32 + i]);
        amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
        s += v[i];
      }
      const float d1 = amax / 127.f, inv1 = amax > 0.f ? 127.f / amax : 0.f;
      const float inv2 = amax > 0.f ? 32512.f / amax : 0.f;
      int8_t* ab = a + (m * KB + kb) * 64;
      int32_t s1 = 0, s2 = 0;
      for (int i = 0; i < 32; ++i) {
        const float q1 = std::nearbyint(v[i] * inv1);
        const float r = v[i] - q1 * d1;
        float q2 = std::nearbyint(r * inv2);
        q2 = q2 > 127.f ? 127.f : (q2 < -127.f ? -127.f : q2);
        ab[i] = static_cast<int8_t>(q1);
        ab[32 + i] = static_cast<int8_t>(q2);
        s1 += static_cast<int32_t>(q1);
        s2 += static_cast<int32_t>(q2);
      }
      ds[m * KB + kb] = d1 / 256.f;
      sx[m * KB + kb] = s;
      sa[m * KB + kb] = 256 * s1 + s2;
    }
  }
}

// One call's activations: x [..., K] (M rows) quantized by quantize_rows, and the output
// [..., N] in x's dtype that the tiles fill.
struct QuantRows {
  int64_t K, M;
  torch::Tensor out;
  std::vector<int8_t> a;
  std::vector<float> da, sx;
  std::vector<int32_t> sa;
  std::vector<int16_t> c16;  // 256 a1 + a2 per column (fills_c16: the AVX2 int8 path's input)
  QuantRows(const torch::Tensor& x, int64_t N)
      : K(x.size(-1)), M(K ? x.numel() / K : 0), a(2 * M * K), da(M * (K / 32)),
        sx(M * (K / 32)), sa(M * (K / 32)) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    out = torch::empty(shape, x.options());
  }
  template <typename T>
  void quantize(const torch::Tensor& x) {
    quantize_rows(x.data_ptr<T>(), M, K, a.data(), da.data(), sx.data(), sa.data());
  }
  // The two digits as one int16 per column, |256 a1 + a2| <= 32639 (row m, block kb at
  // c16[m K + 32 kb]).
  void fill_c16() {
    c16.resize(M * K);
    for (int64_t b = 0; b < M * (K / 32); ++b)
      for (int i = 0; i < 32; ++i)
        c16[b * 32 + i] = static_cast<int16_t>(256 * a[b * 64 + i] + a[b * 64 + 32 + i]);
  }
};

template <typename T>
static inline void store_tile(const float* acc, T* out, int64_t n0, int64_t N) {
  const int64_t n = N - n0 < 16 ? N - n0 : 16;
  for (int64_t j = 0; j < n; ++j) out[n0 + j] = static_cast<T>(acc[j]);
}

template <typename T>
static inline void store_half(const float* acc, T* out, int64_t n0, int64_t N) {
  const int64_t n = N - n0 < 8 ? N - n0 : 8;
  for (int64_t j = 0; j < n; ++j) out[n0 + j] = static_cast<T>(acc[j]);
}

#ifdef QK_AVX512
// Bytes of weight prefetched ahead of the loads (a hint: past the end of a buffer it is
// harmless). Measured over SmolLM2's int4 layers + int8 lm_head, one row, one thread: 3.73 ms
// -> 3.22 ms a forward (1024: 3.41, 4096/8192 as 2048); no change at 8 rows.
#define QK_AHEAD 2048
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One 16-row tile of int4 weights against MC activation rows.
// w: the tile's [K/32][4][16][4] bytes (low nibble: column 8t+i, high: 8t+4+i of the block);
// sc: the tile's [K/G][2][16] (scale, min).
template <int MC, typename S, typename T>
static inline void int4_tile(const uint8_t* w, const S* sc, const int8_t* a, const float* da,
                             const float* sx, const int32_t* sa, T* out, int64_t K, int64_t G,
                             int64_t N, int64_t n0) {
  const int64_t KB = K / 32, bpg = G / 32;
  const __m512i lo = _mm512_set1_epi8(0x0F);
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const S* sp = sc + (kb / bpg) * 32;
    const __m512 s = load16(sp);
    const __m512 off = _mm512_fmadd_ps(_mm512_set1_ps(8.f), s, load16(sp + 16));  // min + 8 s
    __m512i wv[8];
    for (int t = 0; t < 4; ++t) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kb * 256 + t * 64 + QK_AHEAD), _MM_HINT_T0);
      const __m512i raw = _mm512_loadu_si512(w + kb * 256 + t * 64);
      wv[2 * t] = _mm512_and_si512(raw, lo);
      wv[2 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo);
    }
    for (int m = 0; m < MC; ++m) {
      const int32_t* ap = reinterpret_cast<const int32_t*>(a + (m * KB + kb) * 64);
      __m512i d1 = _mm512_setzero_si512();
      // dot(q, 256 a1 + a2) - 8 (256 sum a1 + sum a2) = dot(v, 256 a1 + a2)
      __m512i d = _mm512_set1_epi32(-8 * sa[m * KB + kb]);
      for (int c = 0; c < 8; ++c) {
        d1 = _mm512_dpbusd_epi32(d1, wv[c], _mm512_set1_epi32(ap[c]));
        d = _mm512_dpbusd_epi32(d, wv[c], _mm512_set1_epi32(ap[8 + c]));
      }
      d = _mm512_add_epi32(d, _mm512_slli_epi32(d1, 8));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                               _mm512_mul_ps(s, _mm512_set1_ps(da[m * KB + kb])), acc[m]);
      acc[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(sx[m * KB + kb]), acc[m]);
    }
  }
  alignas(64) float tmp[16];
  for (int m = 0; m < MC; ++m) {
    _mm512_store_ps(tmp, acc[m]);
    store_tile(tmp, out + m * N, n0, N);
  }
}

// One 16-row tile of int8 weights (stored + 128) against MC activation rows.
// w: the tile's [K/32][8][16][4] bytes; sc: the tile's [K/G][16] group scales.
template <int MC, typename S, typename T>
static inline void int8_tile(const uint8_t* w, const S* sc, const int8_t* a, const float* da,
                             const int32_t* sa, const int16_t*, T* out, int64_t K, int64_t G,
                             int64_t N, int64_t n0) {
  const int64_t KB = K / 32, bpg = G / 32;
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const __m512 s = load16(sc + (kb / bpg) * 16);
    __m512i wv[8];
    for (int c = 0; c < 8; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kb * 512 + c * 64 + QK_AHEAD), _MM_HINT_T0);
      wv[c] = _mm512_loadu_si512(w + kb * 512 + c * 64);
    }
    for (int m = 0; m < MC; ++m) {
      const int32_t* ap = reinterpret_cast<const int32_t*>(a + (m * KB + kb) * 64);
      __m512i d1 = _mm512_setzero_si512();
      // dot(q + 128, 256 a1 + a2) - 128 (256 sum a1 + sum a2) = dot(q, 256 a1 + a2)
      __m512i d = _mm512_set1_epi32(-128 * sa[m * KB + kb]);
      for (int c = 0; c < 8; ++c) {
        d1 = _mm512_dpbusd_epi32(d1, wv[c], _mm512_set1_epi32(ap[c]));
        d = _mm512_dpbusd_epi32(d, wv[c], _mm512_set1_epi32(ap[8 + c]));
      }
      d = _mm512_add_epi32(d, _mm512_slli_epi32(d1, 8));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                               _mm512_mul_ps(s, _mm512_set1_ps(da[m * KB + kb])), acc[m]);
    }
  }
  alignas(64) float tmp[16];
  for (int m = 0; m < MC; ++m) {
    _mm512_store_ps(tmp, acc[m]);
    store_tile(tmp, out + m * N, n0, N);
  }
}
#endif

#ifdef QK_AVX2
// The same tiles on 256-bit registers: each 16-row tile runs as two halves of 8 rows (h = 0,
// 1: bytes 32h..32h+31 of every 64-byte run, scales 8h..8h+7), so the packing is the same.
#define QK_AHEAD 2048
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// sum over c < 8 of dot4(u[c], bytes ap[c]) per 32-bit lane: u unsigned bytes <= 15 (int4), a
// signed bytes in [-127, 127]. Without VNNI, maddubs's int16 pair sums are at most 2 * 15 * 127
// and eight of them at most 30480: they add in int16 exactly before one madd.
static inline __m256i dot_u4(const __m256i* u, const int32_t* ap) {
#ifdef __AVXVNNI__
  __m256i d = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) d = _mm256_dpbusd_avx_epi32(d, u[c], _mm256_set1_epi32(ap[c]));
  return d;
#else
  __m256i p = _mm256_maddubs_epi16(u[0], _mm256_set1_epi32(ap[0]));
  for (int c = 1; c < 8; ++c)
    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(u[c], _mm256_set1_epi32(ap[c])));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// Half h of a 16-row int4 tile against MC activation rows (see int4_tile above).
template <int MC, typename S, typename T>
static inline void int4_half(const uint8_t* w, const S* sc, const int8_t* a, const float* da,
                             const float* sx, const int32_t* sa, T* out, int64_t K, int64_t G,
                             int64_t N, int64_t n0, int h) {
  const int64_t KB = K / 32, bpg = G / 32;
  const __m256i lo = _mm256_set1_epi8(0x0F);
  __m256 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const S* sp = sc + (kb / bpg) * 32 + 8 * h;
    const __m256 s = load8(sp);
    const __m256 off = _mm256_fmadd_ps(_mm256_set1_ps(8.f), s, load8(sp + 16));  // min + 8 s
    __m256i wv[8];
    for (int t = 0; t < 4; ++t) {
      const uint8_t* p = w + kb * 256 + t * 64 + 32 * h;
      _mm_prefetch(reinterpret_cast<const char*>(p + QK_AHEAD), _MM_HINT_T0);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      wv[2 * t] = _mm256_and_si256(raw, lo);
      wv[2 * t + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo);
    }
    for (int m = 0; m < MC; ++m) {
      const int32_t* ap = reinterpret_cast<const int32_t*>(a + (m * KB + kb) * 64);
      // dot(q, 256 a1 + a2) - 8 (256 sum a1 + sum a2) = dot(v, 256 a1 + a2)
      __m256i d = _mm256_add_epi32(_mm256_slli_epi32(dot_u4(wv, ap), 8), dot_u4(wv, ap + 8));
      d = _mm256_sub_epi32(d, _mm256_set1_epi32(8 * sa[m * KB + kb]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d),
                               _mm256_mul_ps(s, _mm256_set1_ps(da[m * KB + kb])), acc[m]);
      acc[m] = _mm256_fmadd_ps(off, _mm256_set1_ps(sx[m * KB + kb]), acc[m]);
    }
  }
  alignas(32) float tmp[8];
  for (int m = 0; m < MC; ++m) {
    _mm256_store_ps(tmp, acc[m]);
    store_half(tmp, out + m * N, n0 + 8 * h, N);
  }
}

// Half h of a 16-row int8 tile (stored q + 128) against MC activation rows. With VNNI as the
// AVX-512 path; without, q = stored ^ 0x80 widened to int16 once per block (rows 0-3 and 4-7
// of each column group, into wq) and `vpmaddwd` against the activation's two digits as one
// int16 (c16): int32 pair sums per row (|q c| <= 127 * 32639), added across each row's two
// lanes at the end of the block.
template <int MC, typename S, typename T>
static inline void int8_half(const uint8_t* w, const S* sc, const int8_t* a, const float* da,
                             const int32_t* sa, const int16_t* c16, T* out, int64_t K,
                             int64_t G, int64_t N, int64_t n0, int h) {
  const int64_t KB = K / 32, bpg = G / 32;
  __m256 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const __m256 s = load8(sc + (kb / bpg) * 16 + 8 * h);
#ifdef __AVXVNNI__
    __m256i wv[8];
    for (int c = 0; c < 8; ++c) {
      const uint8_t* p = w + kb * 512 + c * 64 + 32 * h;
      _mm_prefetch(reinterpret_cast<const char*>(p + QK_AHEAD), _MM_HINT_T0);
      wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    }
#else
    alignas(32) int16_t wq[8][2][16];  // [column group][rows 0-3, 4-7][row-major 4 x 4]
    for (int c = 0; c < 8; ++c) {
      const uint8_t* p = w + kb * 512 + c * 64 + 32 * h;
      _mm_prefetch(reinterpret_cast<const char*>(p + QK_AHEAD), _MM_HINT_T0);
      const __m256i q = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_set1_epi8(static_cast<char>(0x80)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(wq[c][0]),
                         _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(wq[c][1]),
                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)));
    }
#endif
    for (int m = 0; m < MC; ++m) {
      const int32_t* ap = reinterpret_cast<const int32_t*>(a + (m * KB + kb) * 64);
#ifdef __AVXVNNI__
      __m256i d1 = _mm256_setzero_si256();
      __m256i d = _mm256_set1_epi32(-128 * sa[m * KB + kb]);
      for (int c = 0; c < 8; ++c) {
        d1 = _mm256_dpbusd_avx_epi32(d1, wv[c], _mm256_set1_epi32(ap[c]));
        d = _mm256_dpbusd_avx_epi32(d, wv[c], _mm256_set1_epi32(ap[8 + c]));
      }
      d = _mm256_add_epi32(d, _mm256_slli_epi32(d1, 8));
#else
      (void)ap;
      const int64_t* cp = reinterpret_cast<const int64_t*>(c16 + m * K + kb * 32);
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i cv = _mm256_set1_epi64x(cp[c]);  // columns 4c..4c+3, int16
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(wq[c][0])), cv));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(wq[c][1])), cv));
      }
      // lanes (row r's two pair sums) -> one per row: hadd gives rows 0 1 4 5 | 2 3 6 7
      __m256i d = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8);
#endif
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d),
                               _mm256_mul_ps(s, _mm256_set1_ps(da[m * KB + kb])), acc[m]);
    }
  }
  alignas(32) float tmp[8];
  for (int m = 0; m < MC; ++m) {
    _mm256_store_ps(tmp, acc[m]);
    store_half(tmp, out + m * N, n0 + 8 * h, N);
  }
}

// The 16-row tiles as two halves.
template <int MC, typename S, typename T>
static inline void int4_tile(const uint8_t* w, const S* sc, const int8_t* a, const float* da,
                             const float* sx, const int32_t* sa, T* out, int64_t K, int64_t G,
                             int64_t N, int64_t n0) {
  for (int h = 0; h < 2 && n0 + 8 * h < N; ++h)
    int4_half<MC>(w, sc, a, da, sx, sa, out, K, G, N, n0, h);
}
template <int MC, typename S, typename T>
static inline void int8_tile(const uint8_t* w, const S* sc, const int8_t* a, const float* da,
                             const int32_t* sa, const int16_t* c16, T* out, int64_t K,
                             int64_t G, int64_t N, int64_t n0) {
  for (int h = 0; h < 2 && n0 + 8 * h < N; ++h)
    int8_half<MC>(w, sc, a, da, sa, c16, out, K, G, N, n0, h);
}
#endif

#ifdef QK_ANY
// Runs BODY for each chunk of at most 8 rows (from row m0), with MC its row count as a
// compile-time constant.
#define QK_CHUNKS(M, BODY)                                     \
  for (int64_t m0 = 0; m0 < (M); m0 += 8) {                     \
    const int64_t mc = (M) - m0 < 8 ? (M) - m0 : 8;            \
    switch (mc) {                                               \
      case 1: { constexpr int MC = 1; BODY; break; }            \
      case 2: { constexpr int MC = 2; BODY; break; }            \
      case 3: { constexpr int MC = 3; BODY; break; }            \
      case 4: { constexpr int MC = 4; BODY; break; }            \
      case 5: { constexpr int MC = 5; BODY; break; }            \
      case 6: { constexpr int MC = 6; BODY; break; }            \
      case 7: { constexpr int MC = 7; BODY; break; }            \
      default: { constexpr int MC = 8; BODY; break; }           \
    }                                                           \
  }
#endif

static int64_t grain_tiles(int64_t K) {
  // at least ~64K weights per task: smaller pieces cost more in fork/join than they save
  const int64_t g = 65536 / (16 * K);
  return g < 1 ? 1 : g;
}

// x [..., K] (M rows; float, bf16 or half); w [NT, K/32, 4, 16, 4] uint8; sc [NT, K/G, 2, 16]
// (half or float) -> [..., N] in x's dtype.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor sc, int64_t N,
                          int64_t G) {
  TORCH_CHECK(available(), "built without a SIMD path");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && w.is_contiguous() && sc.is_contiguous(),
              "contiguous x [..., K] expected");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NT = w.size(0);
  TORCH_CHECK(G > 0 && G % 32 == 0 && K > 0 && K % G == 0 && w.scalar_type() == at::kByte &&
              w.numel() == NT * K * 8 && sc.numel() == NT * (K / G) * 32 && NT * 16 >= N &&
              N > NT * 16 - 16, "int4 pack does not match x");
  QuantRows q(x, N);
  if (M == 0) return q.out;
#ifdef QK_ANY
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_linear", [&] {
    using T = scalar_t;
    q.quantize<T>(x);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    T* op = q.out.data_ptr<T>();
    const int64_t KB = K / 32, NG = K / G;
    auto run = [&](auto* sp) {
      at::parallel_for(0, NT, grain_tiles(K), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          QK_CHUNKS(M, (int4_tile<MC>(wp + t * KB * 256, sp + t * NG * 32,
                                      q.a.data() + m0 * 2 * K, q.da.data() + m0 * KB,
                                      q.sx.data() + m0 * KB, q.sa.data() + m0 * KB,
                                      op + m0 * N,
                                      K, G, N, t * 16)));
        }
      });
    };
    if (sc.scalar_type() == at::kHalf) run(sc.data_ptr<at::Half>());
    else if (sc.scalar_type() == at::kFloat) run(sc.data_ptr<float>());
    else TORCH_CHECK(false, "int4 scales must be half or float");
  });
#endif
  return q.out;
}

// x [..., K] (M rows); w [NT, K/32, 8, 16, 4] uint8 (q + 128); sc [NT, K/G, 16] group scales
// (half or float; G = K: one scale per row) -> [..., N] in x's dtype.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor sc, int64_t N,
                          int64_t G) {
  TORCH_CHECK(available(), "built without a SIMD path");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && w.is_contiguous() && sc.is_contiguous(),
              "contiguous x [..., K] expected");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NT = w.size(0);
  TORCH_CHECK(G > 0 && G % 32 == 0 && K > 0 && K % G == 0 && w.scalar_type() == at::kByte &&
              w.numel() == NT * K * 16 && sc.numel() == NT * (K / G) * 16 && NT * 16 >= N &&
              N > NT * 16 - 16, "int8 pack does not match x");
  QuantRows q(x, N);
  if (M == 0) return q.out;
#ifdef QK_ANY
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    using T = scalar_t;
    q.quantize<T>(x);
#if defined(QK_AVX2) && !defined(__AVXVNNI__)
    q.fill_c16();
#endif
    const uint8_t* wp = w.data_ptr<uint8_t>();
    T* op = q.out.data_ptr<T>();
    const int64_t KB = K / 32, NG = K / G;
    auto run = [&](auto* sp) {
      at::parallel_for(0, NT, grain_tiles(K), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          QK_CHUNKS(M, (int8_tile<MC>(wp + t * KB * 512, sp + t * NG * 16,
                                      q.a.data() + m0 * 2 * K, q.da.data() + m0 * KB,
                                      q.sa.data() + m0 * KB, q.c16.data() + m0 * K,
                                      op + m0 * N, K, G, N, t * 16)));
        }
      });
    };
    if (sc.scalar_type() == at::kHalf) run(sc.data_ptr<at::Half>());
    else if (sc.scalar_type() == at::kFloat) run(sc.data_ptr<float>());
    else TORCH_CHECK(false, "int8 scales must be half or float");
  });
#endif
  return q.out;
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


ISAS = {
    "native": ["-march=native"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx-vnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
}
"""Builds by SHARDSERVE_QUANT_ISA: "native" (the default: -march=native, so the AVX-512 path
on a CPU with AVX512-VNNI, else AVX-VNNI or AVX2 as the CPU has them) or a forced 256-bit path
("avx2", "avx-vnni": no -mavx512*, e.g. to test and time the AVX2 code on an AVX-512 CPU)."""
_NEEDS = {"avx2": {"avx2", "fma", "f16c"}, "avx-vnni": {"avx2", "fma", "f16c", "avx_vnni"}}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f
                         if ln.startswith("flags")), set())
    except OSError:
        return set()


def kernel(isa: str | None = None):
    """The built extension (isa, int4_linear, int8_linear) for `isa` (default
    SHARDSERVE_QUANT_ISA, else "native"), or None: disabled (SHARDSERVE_QUANT_KERNEL=0), no
    compiler, a CPU without AVX2 / FMA / F16C, or a forced path this CPU lacks."""
    isa = isa or os.environ.get("SHARDSERVE_QUANT_ISA", "native")
    if isa not in ISAS:
        raise ValueError(f"SHARDSERVE_QUANT_ISA={isa!r} is not one of {sorted(ISAS)}")
    with _LOCK:
        if isa not in _STATE:
            mod = None
            if os.environ.get("SHARDSERVE_QUANT_KERNEL", "1") != "0" and (
                    isa == "native" or _NEEDS[isa] <= _cpu_flags()):
                suffix = "" if isa == "native" else "_" + isa.replace("-", "")
                mod = native_build.build(
                    "shardserve_quant_gemv" + suffix, _SOURCE,
                    ["isa", "available", "int4_linear", "int8_linear"],
                    cflags=["-O3", *ISAS[isa], "-ffast-math"],
                    what="quantized GEMV kernel (torch's int8/int4 ops instead)")
                if mod is not None and not mod.available():
                    mod = None  # built, but this CPU has no AVX2: torch's kernels
            _STATE[isa] = mod
        return _STATE[isa]


def _tiles(n: int) -> int:
    return -(-n // TILE)


def int4_scales(qparams: torch.Tensor) -> torch.Tensor:
    """Stored qparams [N, K/G, 2] (scale, offset) -> the kernel's (scale, min) float32
    [N, K/G, 2], min = offset - 8 scale (the value at q = 0), rounded as the kernel holds them:
    fp16 where every value either is an fp16 value (GGUF's d and m) or lies in fp16's normal
    range (relative error <= 2^-11), else fp32."""
    qp = qparams.float()
    sm = torch.stack([qp[..., 0], qp[..., 1] - 8.0 * qp[..., 0]], dim=-1)  # [N, K/G, 2]
    h = sm.half().float()
    a = sm.abs()
    if bool(((h == sm) | ((a >= 2.0 ** -14) & (a <= 65504.0))).all()):
        return h
    return sm


def pack_int4(packed: torch.Tensor, qparams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (packed uint8 [N, K/2] signed nibbles, qparams [N, K/G, 2]) -> the kernel's
    (w uint8 [NT, K/32, 4, 16, 4], scales [NT, K/G, 2, 16] fp16 or fp32), NT = ceil(N / 16);
    padding rows have zero scale and min."""
    n, k = packed.shape[0], packed.shape[1] * 2
    nt, kb, pad = _tiles(n), k // BLOCK, -n % TILE
    u = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(n, k)  # [N, K] nibbles
    q = F.pad(u ^ 8, (0, 0, 0, pad))  # [NT*16, K] q = v + 8 in [0, 15]
    # column kb*32 + 8t + 4h + i of row 16 tile + j -> [tile, kb, t, j, i, h]
    q = q.view(nt, TILE, kb, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    w = (q[..., 0] | (q[..., 1] << 4)).contiguous()  # [NT, K/32, 4, 16, 4]
    sm = int4_scales(qparams)  # [N, K/G, 2]
    half = bool((sm.half().float() == sm).all())
    sm = F.pad(sm, (0, 0, 0, 0, 0, pad))  # [NT*16, K/G, 2]
    sc = sm.view(nt, TILE, -1, 2).permute(0, 2, 3, 1).contiguous()  # [NT, K/G, 2, 16]
    return w, sc.half() if half else sc


def dequantize_int4_pack(w: torch.Tensor, sc: torch.Tensor, n: int) -> torch.Tensor:
    """The kernel's int4 (w, sc) -> float32 [n, K], w = q * scale + min as the kernel holds the
    pairs (within fp16's rounding of the stored ones, exact for GGUF-born blocks)."""
    nt, kb = w.shape[0], w.shape[1]
    q = torch.stack([w & 0xF, w >> 4], dim=-1)  # [NT, K/32, 4 t, 16 j, 4 i, 2 h]
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(nt * TILE, kb * BLOCK)[:n].float()  # [N, K]
    sm = sc.float().permute(0, 3, 1, 2).reshape(nt * TILE, -1, 2)[:n]  # [N, K/G, 2]
    g = q.shape[1] // sm.shape[1]
    q = q.view(n, sm.shape[1], g)  # [N, K/G, G]
    return (q * sm[..., 0:1] + sm[..., 1:2]).reshape(n, -1)


def half_or_float(t: torch.Tensor) -> torch.Tensor:
    """Scales as the kernel holds them: fp16 where every value is an fp16 value (grouped int8
    scales are rounded so at quantization, GGUF's d and m are), else float32."""
    t = t.float()
    return t.half() if bool((t.half().float() == t).all()) else t


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (q int8 [N, K], scale [N] per row or [N, K/G] per group) -> the kernel's (w uint8
    [NT, K/32, 8, 16, 4] holding q + 128, scales [NT, K/G, 16] fp16 or fp32, G = K for row
    scales); padding rows have zero scales."""
    n, k = q.shape
    nt, pad = _tiles(n), -n % TILE
    u = (q.to(torch.int16) + 128).to(torch.uint8)  # [N, K]
    u = F.pad(u, (0, 0, 0, pad), value=128)  # [NT*16, K]
    w = u.view(nt, TILE, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    sc = F.pad(scale.float().reshape(n, -1), (0, 0, 0, pad))  # [NT*16, K/G]
    sc = sc.view(nt, TILE, -1).transpose(1, 2).contiguous()  # [NT, K/G, 16]
    return w, half_or_float(sc)


def unpack_int8(w: torch.Tensor, sc: torch.Tensor, n: int,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (w, sc) -> the stored (q int8 [R, K], scale float32 [R, K/G]) of rows ids
    (any shape [...], R = its numel; default all n rows): the inverse of pack_int8, so a
    weight needs no other copy."""
    kb = w.shape[1]
    if ids is None:
        ids = torch.arange(n)
    ids = ids.reshape(-1)
    t, j = ids // TILE, ids % TILE
    rows = w[t, :, :, j, :]  # [R, K/32, 8, 4]
    q = (rows.reshape(-1, kb * BLOCK).to(torch.int16) - 128).to(torch.int8)  # [R, K]
    return q, sc[t, :, j].float()  # [R, K/G]


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (c [M, K/32, 32] = 256 a1 + a2 as float64, step [M, K/32], sx [M, K/32]
    float64) as the kernel computes them (float32 arithmetic, ties to even): x ~= step * c."""
    xb = x.float().reshape(x.shape[0], -1, BLOCK)  # [M, K/32, 32]
    amax = xb.abs().amax(dim=-1, keepdim=True)  # [M, K/32, 1]
    d1 = amax / 127.0
    zero = torch.zeros_like(amax)
    a1 = torch.round(xb * torch.where(amax > 0, 127.0 / amax, zero))
    r = (xb.double() - a1.double() * d1.double()).float()  # one rounding, as the kernel's fma
    a2 = torch.round(r * torch.where(amax > 0, 32512.0 / amax, zero)).clamp_(-127, 127)
    c = a1.double() * 256 + a2.double()
    return c, (d1 / 256.0).double()[..., 0], xb.double().sum(dim=-1)


def reference_int4(x: torch.Tensor, packed: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's result in plain torch: x [M, K], stored packed [N, K/2] and qparams
    [N, K/G, 2] -> [M, N] float64."""
    n, k = packed.shape[0], packed.shape[1] * 2
    sm = int4_scales(qparams).double()  # [N, K/G, 2]
    bpg = k // sm.shape[1] // BLOCK
    scale = sm[..., 0].repeat_interleave(bpg, dim=1)  # [N, K/32]
    mn = sm[..., 1].repeat_interleave(bpg, dim=1)
    u = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(n, k)
    v = ((u ^ 8).double() - 8).view(n, -1, BLOCK)  # [N, K/32, 32] v = q - 8
    c, step, sx = quantize_activation(x)
    dot = torch.einsum("mbi,nbi->mnb", c, v)  # [M, N, K/32]
    off = (mn + 8 * scale)[None]  # [1, N, K/32]
    return (dot * step[:, None, :] * scale[None] + sx[:, None, :] * off).sum(dim=-1)


def reference_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's result in plain torch: x [M, K], stored q [N, K] and scale [N] (per
    row) or [N, K/G] (per group) -> [M, N] float64."""
    c, step, _ = quantize_activation(x)
    n, k = q.shape
    qb = q.double().view(n, -1, BLOCK)  # [N, K/32, 32]
    sc = half_or_float(scale.reshape(n, -1)).double()  # [N, K/G], as the kernel holds them
    sc = sc.repeat_interleave(k // BLOCK // sc.shape[1], dim=1)  # [N, K/32]
    dot = torch.einsum("mbi,nbi->mnb", c, qb)  # [M, N, K/32]
    return (dot * step[:, None, :] * sc[None]).sum(dim=-1)
