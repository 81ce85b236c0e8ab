"""Weight-only int4 / int8 GEMV and small GEMM for decode (few rows), AVX512-VNNI in C++.

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
- int8 (w = q * row scale): the weight is stored as q + 128 (unsigned), so per block
  y += da * (dot(q + 128, a) - 128 * sum(a)), times the row's fp32 scale at the end.

Rows are computed in chunks of up to 8 (every chunk shares each tile's weight loads), tiles of
16 output rows run in parallel (at::parallel_for, torch's intra-op threads). The only
approximation besides fp32 summation order is the activation's int8 rounding (relative error
about 0.4% of a block's max, the size of bf16's own rounding); `reference` computes the same
thing in plain torch (float64) for the tests.

Needs AVX512F/BW and AVX512-VNNI at build time (`-march=native`); elsewhere (AVX2-only CPUs),
without a compiler, or with SHARDSERVE_QUANT_KERNEL=0, `kernel()` is None and quant/kernels.py
keeps torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`. Built once per CPU kind
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
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define QK_AVX512 1
#endif

bool available() {
#ifdef QK_AVX512
  return true;
#else
  return false;
#endif
}

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
};

template <typename T>
static inline void store_tile(const float* acc, T* out, int64_t n0, int64_t N) {
  const int64_t n = N - n0 < 16 ? N - n0 : 16;
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
// w: the tile's [K/32][8][16][4] bytes; rs: the tile's 16 row scales.
template <int MC, typename T>
static inline void int8_tile(const uint8_t* w, const float* rs, const int8_t* a, const float* da,
                             const int32_t* sa, T* out, int64_t K, int64_t N, int64_t n0) {
  const int64_t KB = K / 32;
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
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
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(da[m * KB + kb]), acc[m]);
    }
  }
  const __m512 r = _mm512_loadu_ps(rs);
  alignas(64) float tmp[16];
  for (int m = 0; m < MC; ++m) {
    _mm512_store_ps(tmp, _mm512_mul_ps(acc[m], r));
    store_tile(tmp, out + m * N, n0, N);
  }
}

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
  TORCH_CHECK(available(), "built without AVX512-VNNI");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && w.is_contiguous() && sc.is_contiguous(),
              "contiguous x [..., K] expected");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NT = w.size(0);
  TORCH_CHECK(G > 0 && G % 32 == 0 && K > 0 && K % G == 0 && w.scalar_type() == at::kByte &&
              w.numel() == NT * K * 8 && sc.numel() == NT * (K / G) * 32 && NT * 16 >= N &&
              N > NT * 16 - 16, "int4 pack does not match x");
  QuantRows q(x, N);
  if (M == 0) return q.out;
#ifdef QK_AVX512
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

// x [..., K] (M rows); w [NT, K/32, 8, 16, 4] uint8 (q + 128); rs [NT * 16] float -> [..., N]
// in x's dtype.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor rs, int64_t N) {
  TORCH_CHECK(available(), "built without AVX512-VNNI");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && w.is_contiguous() && rs.is_contiguous(),
              "contiguous x [..., K] expected");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NT = w.size(0);
  TORCH_CHECK(K > 0 && K % 32 == 0 && w.scalar_type() == at::kByte && w.numel() == NT * K * 16 &&
              rs.scalar_type() == at::kFloat && rs.numel() == NT * 16 && NT * 16 >= N &&
              N > NT * 16 - 16, "int8 pack does not match x");
  QuantRows q(x, N);
  if (M == 0) return q.out;
#ifdef QK_AVX512
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    using T = scalar_t;
    q.quantize<T>(x);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const float* rp = rs.data_ptr<float>();
    T* op = q.out.data_ptr<T>();
    const int64_t KB = K / 32;
    at::parallel_for(0, NT, grain_tiles(K), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        QK_CHUNKS(M, (int8_tile<MC>(wp + t * KB * 512, rp + t * 16, q.a.data() + m0 * 2 * K,
                                    q.da.data() + m0 * KB, q.sa.data() + m0 * KB, op + m0 * N, K,
                                    N, t * 16)));
      }
    });
  });
#endif
  return q.out;
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def kernel():
    """The built extension (int4_linear, int8_linear), or None: disabled
    (SHARDSERVE_QUANT_KERNEL=0), no compiler, or a CPU without AVX512-VNNI."""
    with _LOCK:
        if "mod" not in _STATE:
            mod = None
            if os.environ.get("SHARDSERVE_QUANT_KERNEL", "1") != "0":
                mod = native_build.build(
                    "shardserve_quant_gemv", _SOURCE, ["available", "int4_linear", "int8_linear"],
                    cflags=["-O3", "-march=native", "-ffast-math"],
                    what="quantized GEMV kernel (torch's int8/int4 ops instead)")
                if mod is not None and not mod.available():
                    mod = None  # built, but this CPU has no AVX512-VNNI: torch's kernels
            _STATE["mod"] = mod
        return _STATE["mod"]


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


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (q int8 [N, K], scale [N]) -> the kernel's (w uint8 [NT, K/32, 8, 16, 4] holding
    q + 128, row scales float32 [NT * 16]); padding rows have zero scale."""
    n, k = q.shape
    nt, pad = _tiles(n), -n % TILE
    u = (q.to(torch.int16) + 128).to(torch.uint8)  # [N, K]
    u = F.pad(u, (0, 0, 0, pad), value=128)  # [NT*16, K]
    w = u.view(nt, TILE, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    return w, F.pad(scale.float(), (0, pad))


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
    """The int8 kernel's result in plain torch: x [M, K], stored q [N, K] and scale [N] ->
    [M, N] float64."""
    c, step, _ = quantize_activation(x)
    qb = q.double().view(q.shape[0], -1, BLOCK)  # [N, K/32, 32]
    dot = torch.einsum("mbi,nbi->mnb", c, qb)  # [M, N, K/32]
    return (dot * step[:, None, :]).sum(dim=-1) * scale.double()[None]
