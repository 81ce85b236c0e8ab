"""Decode attention straight from the paged KV pool: one C++ kernel call per layer.

A decode row has one query token; its keys live in the pool's blocks named by the row's block
table. The torch path (paged_cache.py) copies those blocks out every layer (`index_select`,
[R, S, 2, Hkv, D]) and then runs SDPA, whose CPU flash kernel costs ~100 us of set-up per call
even for one query: both dominate the attention time of a decode step (loadtest/results/
engine.md). This kernel reads each key and value where it lies in the pool, once, in fp32
(bf16 values are exact in fp32), with an exact two-pass softmax per (row, query head), and
writes the output rounded once to q's dtype; rows x KV heads run in parallel (at::parallel_for,
torch's intra-op threads), the G = H / Hkv query heads of a KV head share its reads (GQA).

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

// q [R, H, D]; pool [slots, 2, Hkv, D] (one layer: K then V of each slot); tables [R, nb]
// int64 block ids; lens [R] int64 keys per row (position + 1) -> out [R, H, D] in q's dtype.
// Built with -ffast-math: every value here is finite (no -inf initial maximum, no masks).
// DC, GC > 0: head size and query heads per KV head known at compile time (the loops unroll
// and the G x D accumulators stay in registers); 0: taken from the arguments.
template <typename T, int64_t DC, int64_t GC>
static void run(const T* q, const T* pool, const int64_t* tables, const int64_t* lens,
                T* out, int64_t R, int64_t H, int64_t Hkv, int64_t D_, int64_t nb,
                int64_t bs, float scale) {
  const int64_t D = DC ? DC : D_, G = GC ? GC : H / Hkv;
  const int64_t slot_stride = 2 * Hkv * D;  // elements from one slot to the next
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), sc, mx(G), den(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / Hkv, h = w % Hkv, L = lens[r];
      const int64_t* table = tables + r * nb;
      to_float(q + (r * H + h * G) * D, qf.data(), G * D);  // heads h*G .. h*G+G-1
      for (int64_t i = 0; i < G * D; ++i) qf[i] *= scale;
      sc.resize(G * L);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::max());
      for (int64_t t = 0; t < L; ++t) {  // scores: each key read once for the G heads
        to_float(pool + (table[t / bs] * bs + t % bs) * slot_stride + h * D, kf.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          sc[g * L + t] = s;
          mx[g] = s > mx[g] ? s : mx[g];
        }
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
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {  // values: each read once for the G heads
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

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor pool, torch::Tensor tables,
                                     torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && pool.dim() == 4 && tables.dim() == 2 && lens.dim() == 1,
              "q [R, H, D], pool [slots, 2, Hkv, D], tables [R, nb], lens [R]");
  TORCH_CHECK(q.is_contiguous() && pool.is_contiguous() && tables.is_contiguous() &&
              lens.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(q.scalar_type() == pool.scalar_type(), "q and pool dtypes differ");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "int64 tables and lens expected");
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), Hkv = pool.size(2);
  TORCH_CHECK(pool.size(1) == 2 && pool.size(3) == D && H % Hkv == 0 && tables.size(0) == R &&
              lens.size(0) == R, "shapes do not match");
  const int64_t nb = tables.size(1), num_blocks = pool.size(0) / block_size;
  TORCH_CHECK(block_size > 0 && pool.size(0) % block_size == 0, "pool is not whole blocks");
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {  // every block a row reads exists: no read out of the pool
    TORCH_CHECK(ln[r] >= 1 && ln[r] <= nb * block_size, "row ", r, ": bad key count ", ln[r]);
    for (int64_t b = 0; b < (ln[r] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tb[r * nb + b] >= 0 && tb[r * nb + b] < num_blocks, "row ", r,
                  ": block id out of the pool");
  }
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto* fn = &run<scalar_t, 0, 0>;
    if (D == 64 && H / Hkv == 3) fn = &run<scalar_t, 64, 3>;  // SmolLM2
    else if (D == 128 && H / Hkv == 4) fn = &run<scalar_t, 128, 4>;  // Llama 3 8B-like
    fn(q.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(),
       lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), R, H, Hkv, D, nb, block_size,
       static_cast<float>(scale));
  });
  return out;
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def kernel():
    """The built extension's `paged_decode_attention`, or None (disabled, or no compiler)."""
    with _LOCK:
        if "fn" in _STATE:
            return _STATE["fn"]
        fn = None
        if os.environ.get("SHARDSERVE_DECODE_KERNEL", "1") != "0":
            mod = native_build.build(
                "shardserve_decode_attention", _SOURCE, ["paged_decode_attention"],
                cflags=["-O3", "-march=native", "-ffast-math"],
                what="decode attention kernel (using gather + SDPA)")
            fn = None if mod is None else mod.paged_decode_attention
        _STATE["fn"] = fn
        return fn


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
