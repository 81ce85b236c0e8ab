"""Decode attention straight from the paged KV pool: one C++ kernel call per layer.

A decode row has one query token; its keys live in the pool's blocks named by the row's block
table. The torch path (paged_cache.py) copies those blocks out every layer (`index_select`,
[R, S, 2, Hkv, D]) and then runs SDPA, whose CPU flash kernel costs ~100 us of set-up per call
even for one query: both dominate the attention time of a decode step (loadtest/results/
engine.md). This kernel reads each key and value where it lies in the pool, once, in fp32
(bf16 values are exact in fp32), with an exact two-pass softmax per (row, query head), and
writes the output rounded once to q's dtype; rows x KV heads run in parallel (at::parallel_for,
torch's intra-op threads), the G = H / Hkv query heads of a KV head share its reads (GQA).

At 32 rows x ~150 keys SmolLM2 reads ~110 MB of K/V a step (40% of its weight bytes), so the
kernel is bound by memory latency and bandwidth: each loop prefetches the key 16 ahead (a row's
keys are one slot apart inside scattered blocks). For bf16 heads of 64 or 128 on a CPU with
AVX512-BF16, scores are `vdpbf16ps` dot products (exact bf16 products, fp32 sums) of 16 keys
at a time with one transpose-add tree for their 16 horizontal sums, and the value pass keeps
the G x D fp32 accumulators in registers. One thread, 32 rows x 150 keys of a 378 MB pool:
386 -> 218 us a layer (2026-12-06, shared machine; loadtest/results/engine.md section 8).

`step_kernel()` is the same extension's whole layer step for a flat batch: it writes every
token's K and V into its slot and attends the decode rows, reading q, k and v in place from the
QKV projection's output and writing into one output buffer (no index_copy_, no contiguous
copy of q, no cat).

Built on first use with torch.utils.cpp_extension (g++, ~20-60 s once; cached under
TORCH_EXTENSIONS_DIR, in a folder named after this CPU's flags since `-march=native` code must
not run on another CPU kind: shardserve_sharding.models.native_build). Where it cannot be built,
or SHARDSERVE_DECODE_KERNEL=0, `kernel()` is None and the cache keeps the gather + SDPA path.
`reference` is the same computation in plain torch (tests compare the two).
"""

from __future__ import annotations

import os
import threading

import torch

from shardserve_sharding.models import native_build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Loads n elements as fp32: bf16 by a 16-bit shift (a loop GCC vectorizes), others by cast.
template <typename T>
static inline void to_float(const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}
template <>
inline void to_float<at::BFloat16>(const at::BFloat16* x, float* y, int64_t n) {
  const uint16_t* b = reinterpret_cast<const uint16_t*>(x);
  uint32_t* u = reinterpret_cast<uint32_t*>(y);
  for (int64_t i = 0; i < n; ++i) u[i] = static_cast<uint32_t>(b[i]) << 16;
}

// Asks for the n elements at x ahead of use: a row's keys sit in blocks anywhere in the pool,
// one slot (2 x Hkv x D) apart inside a block, which the hardware prefetchers follow poorly
// (measured: 1.2-1.6x faster decode attention with the prefetch 16 keys ahead).
constexpr int64_t PF = 16;  // keys ahead that the score and value loops prefetch
template <typename T>
static inline void prefetch_row(const T* x, int64_t n) {
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
#include <type_traits>

""" + native_build.AVX512_HSUM16 + r"""
// Scores of G query heads (bf16, head stride q_hs) against keys 0..L-1 of KV head h, scaled,
// into sc[g * L + t]: AVX512-BF16 dot products (exact bf16 products, fp32 sums) of 16 keys at
// a time, whose 16 x G horizontal sums are one transpose-add tree per head.
template <int64_t D, int64_t G>
static inline void scores_bf16(const at::BFloat16* q, int64_t q_hs, const at::BFloat16* pool,
                               const int64_t* table, int64_t h, int64_t L, int64_t bs,
                               int64_t slot_stride, float scale, float* sc) {
  constexpr int64_t NV = D / 32;  // 512-bit vectors of 32 bf16 in a head row
  __m512bh qv[G][NV];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < NV; ++j)
      qv[g][j] = (__m512bh)_mm512_loadu_si512(q + g * q_hs + 32 * j);
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 part[G][16];
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int64_t n = L - t0 < 16 ? L - t0 : 16;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      const at::BFloat16* k = pool + (table[t / bs] * bs + t % bs) * slot_stride + h * D;
      if (t + PF < L)  // the key PF ahead: its block may be anywhere in the pool
        prefetch_row(pool + (table[(t + PF) / bs] * bs + (t + PF) % bs) * slot_stride + h * D,
                     D);
      __m512bh kv[NV];
      for (int64_t j = 0; j < NV; ++j) kv[j] = (__m512bh)_mm512_loadu_si512(k + 32 * j);
      for (int64_t g = 0; g < G; ++g) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t j = 0; j < NV; ++j) a = _mm512_dpbf16_ps(a, qv[g][j], kv[j]);
        part[g][i] = a;
      }
    }
    for (int64_t i = n; i < 16; ++i)
      for (int64_t g = 0; g < G; ++g) part[g][i] = _mm512_setzero_ps();
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
    for (int64_t g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(sc + g * L + t0, m, _mm512_mul_ps(hsum16(part[g]), vscale));
  }
}
// out[g * D + d] = sum_t p[g * L + t] * V[t][d] * inv[g] for G heads of KV head h, rounded once
// to bf16: the G x D fp32 accumulators stay in registers, each value row is read once.
template <int64_t D, int64_t G>
static inline void values_bf16(const float* p, int64_t L, const at::BFloat16* pool,
                               const int64_t* table, int64_t h, int64_t Hkv, int64_t bs,
                               int64_t slot_stride, const float* inv, at::BFloat16* out) {
  constexpr int64_t NF = D / 16;  // 512-bit vectors of 16 fp32 in a head row
  __m512 acc[G][NF];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < NF; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const at::BFloat16* v = pool + (table[t / bs] * bs + t % bs) * slot_stride + (Hkv + h) * D;
    if (t + PF < L)
      prefetch_row(pool + (table[(t + PF) / bs] * bs + (t + PF) % bs) * slot_stride +
                   (Hkv + h) * D, D);
    __m512 vf[NF];
    for (int64_t j = 0; j < NF; ++j)  // bf16 -> fp32: the 16 bits moved to the top
      vf[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * j))), 16));
    for (int64_t g = 0; g < G; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * L + t]);
      for (int64_t j = 0; j < NF; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vf[j], acc[g][j]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 ig = _mm512_set1_ps(inv[g]);
    for (int64_t j = 0; j < NF; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][j], ig)));
  }
}
#endif

// q [R, H, D]; pool [slots, 2, Hkv, D] (one layer: K then V of each slot); tables [R, nb]
// int64 block ids; lens [R] int64 keys per row (position + 1) -> out [R, H, D] in q's dtype.
// Built with -ffast-math: every value here is finite (no -inf initial maximum, no masks).
// DC, GC > 0: head size and query heads per KV head known at compile time (the loops unroll
// and the G x D accumulators stay in registers); 0: taken from the arguments.
// q_rs, q_hs: elements from one row / head of q to the next (q is read in place, e.g. from
// the fused QKV projection's output); out [R, H, D] is contiguous from `out`.
template <typename T, int64_t DC, int64_t GC>
static void run(const T* q, int64_t q_rs, int64_t q_hs, const T* pool, const int64_t* tables,
                const int64_t* lens, T* out, int64_t R, int64_t H, int64_t Hkv, int64_t D_,
                int64_t nb, int64_t bs, float scale) {
  const int64_t D = DC ? DC : D_, G = GC ? GC : H / Hkv;
  const int64_t slot_stride = 2 * Hkv * D;  // elements from one slot to the next
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), sc, mx(G), den(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / Hkv, h = w % Hkv, L = lens[r];
      const int64_t* table = tables + r * nb;
      for (int64_t g = 0; g < G; ++g)  // heads h*G .. h*G+G-1
        to_float(q + r * q_rs + (h * G + g) * q_hs, qf.data() + g * D, D);
      sc.resize(G * L);
      bool fast = false;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same<T, at::BFloat16>::value && DC > 0 && DC % 32 == 0 && GC > 0) {
        scores_bf16<DC, GC>(q + r * q_rs + h * G * q_hs, q_hs, pool, table, h, L, bs,
                            slot_stride, scale, sc.data());
        fast = true;
      }
#endif
      if (!fast) {
        for (int64_t i = 0; i < G * D; ++i) qf[i] *= scale;
        for (int64_t t = 0; t < L; ++t) {  // scores: each key read once for the G heads
          if (t + PF < L) prefetch_row(pool + (table[(t + PF) / bs] * bs + (t + PF) % bs) *
                                       slot_stride + h * D, D);
          to_float(pool + (table[t / bs] * bs + t % bs) * slot_stride + h * D, kf.data(), D);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
            sc[g * L + t] = s;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* e = sc.data() + g * L;
        float m = e[0];
        for (int64_t t = 1; t < L; ++t) m = e[t] > m ? e[t] : m;
        mx[g] = m;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* e = sc.data() + g * L;
        const float m = mx[g];
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) {
          e[t] = std::exp(e[t] - m);
          sum += e[t];
        }
        den[g] = sum;
      }
#if defined(__AVX512BF16__)
      if constexpr (std::is_same<T, at::BFloat16>::value && DC > 0 && DC % 32 == 0 && GC > 0) {
        for (int64_t g = 0; g < G; ++g) den[g] = 1.f / den[g];
        values_bf16<DC, GC>(sc.data(), L, pool, table, h, Hkv, bs, slot_stride, den.data(),
                            out + (r * H + h * G) * D);
        continue;
      }
#endif
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {  // values: each read once for the G heads
        if (t + PF < L) prefetch_row(pool + (table[(t + PF) / bs] * bs + (t + PF) % bs) *
                                     slot_stride + (Hkv + h) * D, D);
        to_float(pool + (table[t / bs] * bs + t % bs) * slot_stride + (Hkv + h) * D,
                 kf.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = sc[g * L + t];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * kf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / den[g];
        T* o = out + (r * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

// Checks the block tables and key counts against the pool: no read outside it.
static void check_tables(const torch::Tensor& pool, const torch::Tensor& tables,
                         const torch::Tensor& lens, int64_t R, int64_t block_size) {
  TORCH_CHECK(tables.dim() == 2 && lens.dim() == 1 && tables.size(0) == R && lens.size(0) == R,
              "tables [R, nb], lens [R] expected");
  TORCH_CHECK(tables.is_contiguous() && lens.is_contiguous(), "contiguous tables and lens");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "int64 tables and lens expected");
  TORCH_CHECK(block_size > 0 && pool.size(0) % block_size == 0, "pool is not whole blocks");
  const int64_t nb = tables.size(1), num_blocks = pool.size(0) / block_size;
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(ln[r] >= 1 && ln[r] <= nb * block_size, "row ", r, ": bad key count ", ln[r]);
    for (int64_t b = 0; b < (ln[r] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tb[r * nb + b] >= 0 && tb[r * nb + b] < num_blocks, "row ", r,
                  ": block id out of the pool");
  }
}

template <typename T>
static void dispatch_run(const T* q, int64_t q_rs, int64_t q_hs, const torch::Tensor& pool,
                         const torch::Tensor& tables, const torch::Tensor& lens, T* out,
                         int64_t R, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                         double scale) {
  auto* fn = &run<T, 0, 0>;
  if (D == 64 && H / Hkv == 3) fn = &run<T, 64, 3>;  // SmolLM2
  else if (D == 128 && H / Hkv == 4) fn = &run<T, 128, 4>;  // Llama 3 8B-like
  fn(q, q_rs, q_hs, pool.data_ptr<T>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
     out, R, H, Hkv, D, tables.size(1), block_size, static_cast<float>(scale));
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor pool, torch::Tensor tables,
                                     torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && pool.dim() == 4, "q [R, H, D], pool [slots, 2, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && pool.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(q.scalar_type() == pool.scalar_type(), "q and pool dtypes differ");
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), Hkv = pool.size(2);
  TORCH_CHECK(pool.size(1) == 2 && pool.size(3) == D && H % Hkv == 0, "shapes do not match");
  check_tables(pool, tables, lens, R, block_size);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    dispatch_run<scalar_t>(q.data_ptr<scalar_t>(), H * D, D, pool, tables, lens,
                           out.data_ptr<scalar_t>(), R, H, Hkv, D, block_size, scale);
  });
  return out;
}

// One layer's attention step over the pool for a flat step whose last R tokens are decode rows:
// q [N, H, D], k, v [N, Hkv, D] (any row/head strides, D contiguous: views of the QKV
// projection's output), pool [slots, 2, Hkv, D], write [N] int64 slots. Writes every token's K
// and V into its slot, then attends the decode rows (tables [R, nb], lens [R]) into rows
// N-R .. N-1 of out [N, H, D] (contiguous); the caller fills the prompt-chunk rows before them.
void paged_attend_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor pool,
                       torch::Tensor write, torch::Tensor tables, torch::Tensor lens,
                       torch::Tensor out, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && pool.dim() == 4 &&
              write.dim() == 1 && out.dim() == 3,
              "q [N, H, D], k, v [N, Hkv, D], pool [slots, 2, Hkv, D], write [N], out [N, H, D]");
  TORCH_CHECK(pool.is_contiguous() && out.is_contiguous() && write.is_contiguous(),
              "contiguous pool, out and write expected");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "q, k, v: the head dimension must be contiguous");
  const auto dt = pool.scalar_type();
  TORCH_CHECK(q.scalar_type() == dt && k.scalar_type() == dt && v.scalar_type() == dt &&
              out.scalar_type() == dt, "q, k, v, out and pool dtypes differ");
  TORCH_CHECK(write.scalar_type() == at::kLong, "int64 write slots expected");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = pool.size(2);
  const int64_t R = tables.dim() == 2 ? tables.size(0) : -1;
  TORCH_CHECK(pool.size(1) == 2 && pool.size(3) == D && H % Hkv == 0 && k.size(0) == N &&
              v.size(0) == N && k.size(1) == Hkv && v.size(1) == Hkv && k.size(2) == D &&
              v.size(2) == D && write.size(0) == N && out.size(0) == N && out.size(1) == H &&
              out.size(2) == D && R >= 0 && R <= N, "shapes do not match");
  const int64_t slots = pool.size(0);
  const int64_t* ws = write.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(ws[n] >= 0 && ws[n] < slots, "token ", n, ": write slot out of the pool");
  check_tables(pool, tables, lens, R, block_size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "paged_attend_step", [&] {
    scalar_t* pl = pool.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
    const size_t row_bytes = D * sizeof(scalar_t);
    for (int64_t n = 0; n < N; ++n) {  // K then V heads of a slot: the pool's layout
      scalar_t* slot = pl + ws[n] * 2 * Hkv * D;
      for (int64_t h = 0; h < Hkv; ++h) {
        std::memcpy(slot + h * D, kp + n * ks0 + h * ks1, row_bytes);
        std::memcpy(slot + (Hkv + h) * D, vp + n * vs0 + h * vs1, row_bytes);
      }
    }
    if (R > 0)
      dispatch_run<scalar_t>(q.data_ptr<scalar_t>() + (N - R) * q.stride(0), q.stride(0),
                             q.stride(1), pool, tables, lens,
                             out.data_ptr<scalar_t>() + (N - R) * H * D, R, H, Hkv, D,
                             block_size, scale);
  });
}

// paged_attend_step over the fused QKV projection's output itself: qkv [N, (H + 2 Hkv) D]
// (rows may be strided, columns contiguous: q heads, then k, then v) -> out [N, H D]. The
// views are made here, not in Python (a decode layer's dozen view ops cost more than this).
torch::Tensor paged_attend_qkv(torch::Tensor qkv, torch::Tensor pool, torch::Tensor write,
                               torch::Tensor tables, torch::Tensor lens, int64_t block_size,
                               double scale) {
  TORCH_CHECK(qkv.dim() == 2 && pool.dim() == 4 && qkv.stride(1) == 1,
              "qkv [N, (H + 2 Hkv) D] with contiguous rows, pool [slots, 2, Hkv, D] expected");
  const int64_t N = qkv.size(0), Hkv = pool.size(2), D = pool.size(3);
  TORCH_CHECK(D > 0 && qkv.size(1) % D == 0 && qkv.size(1) / D > 2 * Hkv,
              "qkv's width is not (H + 2 Hkv) x D");
  const int64_t H = qkv.size(1) / D - 2 * Hkv;
  auto heads = qkv.view({N, H + 2 * Hkv, D});
  auto out = torch::empty({N, H, D}, qkv.options());
  paged_attend_step(heads.narrow(1, 0, H), heads.narrow(1, H, Hkv),
                    heads.narrow(1, H + Hkv, Hkv), pool, write, tables, lens, out, block_size,
                    scale);
  return out.view({N, H * D});
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _module():
    """The built extension, or None (SHARDSERVE_DECODE_KERNEL=0, or no compiler)."""
    with _LOCK:
        if "mod" not in _STATE:
            mod = None
            if os.environ.get("SHARDSERVE_DECODE_KERNEL", "1") != "0":
                mod = native_build.build(
                    "shardserve_decode_attention", _SOURCE,
                    ["paged_decode_attention", "paged_attend_step", "paged_attend_qkv"],
                    cflags=["-O3", "-march=native", "-ffast-math"],
                    what="decode attention kernel (using gather + SDPA)")
            _STATE["mod"] = mod
        return _STATE["mod"]


def kernel():
    """`paged_decode_attention(q [R, H, D], pool, tables, lens, block_size, scale)` -> [R, H, D],
    or None (disabled, or no compiler)."""
    mod = _module()
    return None if mod is None else mod.paged_decode_attention


def qkv_kernel():
    """`paged_attend_qkv(qkv, pool, write, tables, lens, block_size, scale)`: step_kernel()
    reading the fused QKV output [N, (H + 2 Hkv) D] itself, returning [N, H D]; or None."""
    mod = _module()
    return None if mod is None else mod.paged_attend_qkv


def step_kernel():
    """`paged_attend_step(q, k, v, pool, write, tables, lens, out, block_size, scale)`: one
    layer's K/V writes and decode attention of a flat step in one call (see _SOURCE), or None."""
    mod = _module()
    return None if mod is None else mod.paged_attend_step


def reference(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
              block_size: int, scale: float) -> torch.Tensor:
    """The kernel's computation in plain torch, row by row (for tests): q [R, H, D], pool
    [slots, 2, Hkv, D], tables [R, nb], lens [R] -> [R, H, D] in q's dtype."""
    out = torch.empty_like(q)
    hkv = pool.shape[2]
    for r in range(q.shape[0]):
        n = int(lens[r])
        t = torch.arange(n)
        slots = tables[r, t // block_size] * block_size + t % block_size  # [n]
        kv = pool[slots].float()  # [n, 2, Hkv, D]
        k = kv[:, 0].repeat_interleave(q.shape[1] // hkv, dim=1)  # [n, H, D]
        v = kv[:, 1].repeat_interleave(q.shape[1] // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[r].float(), k) * scale  # [H, n]
        out[r] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)  # [H, D]
    return out
