"""Fused CPU kernels for the small operators of a bf16 Llama forward (inference only).

A 1-row SmolLM2 decode forward is ~31 ms on one core, ~7 ms of it outside the GEMMs: each
RMSNorm of a bf16 tensor is ~8 aten ops (upcast, pow, sum, div_, add_, rsqrt, mul, downcast,
x weight), rotary ~10 (gathered cos/sin tables cast to bf16, slice, neg, cat, mul, addcmul),
SiLU x up 2, each residual add 1: ~1,500 dispatches per forward. Three kernels do the same
arithmetic in one pass each over the row:

- `add_rms_norm_(x, delta, w, eps)`: x += delta (in place), returns rms_norm(x) * w; delta
  None: the norm alone;
- `rotary_(qkv, positions, cos, sin, heads, head_dim)`: the rotate-half rotary embedding,
  applied in place to the first `heads` heads (queries, then keys) of the fused QKV output,
  reading each token's row of the fp32 cos/sin tables;
- `silu_mul(gate_up)`: silu(gate) * up of the fused gate/up output.

They round exactly where the torch path of models/llama.py rounds (fp32 math, bf16 results at
the same points), and use torch's own vector code (ATen's Vectorized, Sleef's exp, the order of
additions of torch's fp32 row sum), so that their outputs are meant to be bit-identical to
`reference_*` below, the torch path itself; tests/sharding/test_fused_ops.py checks that.

Built like the decode attention kernel (models/native_build.py: g++, -march=native, cached per
CPU kind and per ATen vector capability, since the kernels must use the vector code torch's
own kernels run at: checked bit-identical here at AVX512, AVX2 and DEFAULT, the last two
through ATEN_CPU_CAPABILITY; built once by .ci/setup). `kernels()` is None where it cannot be
built or SHARDSERVE_FUSED_OPS=0; `active(x)` says whether a forward over x may use them: bf16 on
the CPU, no autograd (training and fp32 inference keep the plain torch path), not inside
torch.compile or a jit trace.
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F

from . import native_build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <cstdint>
#include <vector>

using at::vec::Vectorized;
using fVec = Vectorized<float>;
using bVec = Vectorized<at::BFloat16>;
constexpr int64_t kF = fVec::size();  // fp32 lanes; a bVec holds 2 * kF bf16 values

// bf16 <-> two fp32 vectors; cnt < 2 * kF: only the first cnt elements (the rest read as 0)
static inline void load_bf16(const at::BFloat16* p, fVec& a, fVec& b, int64_t cnt = 2 * kF) {
  auto v = cnt == 2 * kF ? bVec::loadu(p) : bVec::loadu(p, cnt);
  std::tie(a, b) = at::vec::convert_to_float<at::BFloat16>(v);
}
static inline void store_bf16(at::BFloat16* p, const fVec& a, const fVec& b,
                              int64_t cnt = 2 * kF) {
  auto v = at::vec::convert_from_float<at::BFloat16>(a, b);
  if (cnt == 2 * kF) v.store(p); else v.store(p, cnt);
}
static inline void load_f32(const float* p, fVec& a, fVec& b, int64_t cnt = 2 * kF) {
  if (cnt == 2 * kF) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kF);
  } else {
    a = fVec::loadu(p, std::min(cnt, kF));
    b = cnt > kF ? fVec::loadu(p + kF, cnt - kF) : fVec(0.f);
  }
}
static inline int64_t ceil_log2(int64_t x) {
  return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// Sum of n fp32 values, adding in the order of torch's contiguous fp32 row sum (SumKernel.cpp:
// vectorized_inner_sum -> row_sum (4 interleaved vector accumulators) -> multi_row_sum (a
// 4-level cascade)), so that mean() here equals torch's to the last bit. torch registers that
// kernel for AVX2 (8 lanes) even on AVX-512 CPUs, and its generic vectors are 8 floats too:
// the lanes here are 8 whatever this build's vector width (measured: 16 lanes differ on ~1 row
// in 1,000 of SmolLM2 activations after rounding to bf16).
constexpr int64_t kSumLanes = 8;
struct Lanes {
  float v[kSumLanes];
  void zero() { for (int64_t l = 0; l < kSumLanes; ++l) v[l] = 0.f; }
  void add(const float* p) { for (int64_t l = 0; l < kSumLanes; ++l) v[l] += p[l]; }
  void add(const Lanes& o) { for (int64_t l = 0; l < kSumLanes; ++l) v[l] += o.v[l]; }
};

static float torch_row_sum(const float* p, int64_t n) {
  const int64_t vec_size = n / kSumLanes, size_ilp = vec_size / 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size_ilp) / 4);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  Lanes acc[4][4];
  for (int j = 0; j < 4; ++j)
    for (int k = 0; k < 4; ++k) acc[j][k].zero();
  int64_t i = 0;
  for (; i + level_step <= size_ilp;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k].add(p + (i * 4 + k) * kSumLanes);
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k].add(acc[j - 1][k]);
        acc[j - 1][k].zero();
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size_ilp; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k].add(p + (i * 4 + k) * kSumLanes);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k].add(acc[j][k]);
  for (int64_t t = size_ilp * 4; t < vec_size; ++t) acc[0][0].add(p + t * kSumLanes);
  for (int k = 1; k < 4; ++k) acc[0][0].add(acc[0][k]);
  float total = 0.f;
  for (int64_t t = vec_size * kSumLanes; t < n; ++t) total += p[t];
  for (int64_t l = 0; l < kSumLanes; ++l) total += acc[0][0].v[l];
  return total;
}

// x [N, C] bf16 (in place: x += delta when delta is given), w [C] -> y [N, C]:
// y = bf16(w * bf16(x * 1/sqrt(sum(x*x) / C + eps))), as F.rms_norm of bf16 then * w.
torch::Tensor add_rms_norm_(torch::Tensor x, c10::optional<torch::Tensor> delta,
                            torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16 x and weight expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous x and weight expected");
  const int64_t C = w.numel();
  TORCH_CHECK(C > 0 && x.size(-1) == C, "last dim ", x.size(-1), " must equal the weight's ",
              C);
  const at::BFloat16* dp = nullptr;
  if (delta.has_value()) {
    TORCH_CHECK(delta->scalar_type() == at::kBFloat16 && delta->is_contiguous() &&
                delta->sizes() == x.sizes(), "delta must be a contiguous bf16 tensor like x");
    dp = delta->data_ptr<at::BFloat16>();
  }
  const int64_t N = x.numel() / C;
  auto y = torch::empty_like(x);
  auto* xp = x.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  const fVec epsv(static_cast<float>(eps));
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(C + 2 * kF), sq(C + 2 * kF);
    for (int64_t r = begin; r < end; ++r) {
      at::BFloat16* xr = xp + r * C;
      for (int64_t c = 0; c < C; c += 2 * kF) {
        const int64_t m = std::min(2 * kF, C - c);
        fVec a, b;
        load_bf16(xr + c, a, b, m);
        if (dp) {  // x + delta rounds once to fp32, then to bf16 (torch's bf16 add)
          fVec da, db;
          load_bf16(dp + r * C + c, da, db, m);
          store_bf16(xr + c, a + da, b + db, m);
          load_bf16(xr + c, a, b, m);
        }
        a.store(xf.data() + c);
        b.store(xf.data() + c + kF);
        (a * a).store(sq.data() + c);
        (b * b).store(sq.data() + c + kF);
      }
      // mean = sum / C, then + eps, then 1 / sqrt, each rounded to fp32 (torch's ops)
      const float ms = torch_row_sum(sq.data(), C) / static_cast<float>(C);
      const fVec rs = fVec(1.f) / (fVec(ms) + epsv).sqrt();
      for (int64_t c = 0; c < C; c += 2 * kF) {
        const int64_t m = std::min(2 * kF, C - c);
        fVec a = fVec::loadu(xf.data() + c) * rs, b = fVec::loadu(xf.data() + c + kF) * rs;
        // round the normalised row to bf16, then multiply by the weight (bf16 * bf16)
        store_bf16(yp + r * C + c, a, b, m);
        fVec na, nb, wa, wb;
        load_bf16(yp + r * C + c, na, nb, m);
        load_bf16(wp + c, wa, wb, m);
        store_bf16(yp + r * C + c, wa * na, wb * nb, m);
      }
    }
  });
  return y;
}

// qkv [N, Hall * D] bf16; rotates heads 0 .. heads-1 of every token in place with the fp32
// tables cos, sin [S, D] at positions [N] (int64): as the torch path, cos and sin are first
// rounded to bf16, then t = bf16(x * cos) and x' = bf16(t + rot(x) * sin).
void rotary_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
             int64_t heads, int64_t D) {
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous(), "contiguous bf16 qkv");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
              cos.sizes() == sin.sizes() && cos.size(1) == D, "fp32 cos, sin [S, D] expected");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "int64 positions expected");
  TORCH_CHECK(D > 0 && D % 2 == 0, "head size ", D, " is not even");
  const int64_t row = qkv.size(-1), N = qkv.numel() / row, S = cos.size(0), half = D / 2;
  TORCH_CHECK(positions.numel() == N && heads * D <= row, "shapes do not match");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(pos[n] >= 0 && pos[n] < S, "position ", pos[n], " outside the rotary table");
  auto* qp = qkv.data_ptr<at::BFloat16>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> cb(D + 2 * kF), sb(D + 2 * kF);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t d = 0; d < D; d += 2 * kF) {  // this token's cos, sin rounded to bf16
        const int64_t m = std::min(2 * kF, D - d);
        fVec a, b;
        load_f32(cp + pos[n] * D + d, a, b, m);
        store_bf16(cb.data() + d, a, b, m);
        load_f32(sp + pos[n] * D + d, a, b, m);
        store_bf16(sb.data() + d, a, b, m);
      }
      for (int64_t h = 0; h < heads; ++h) {
        at::BFloat16* x = qp + n * row + h * D;
        for (int64_t d = 0; d < half; d += 2 * kF) {
          const int64_t m = std::min(2 * kF, half - d);
          fVec x1a, x1b, x2a, x2b, c1a, c1b, c2a, c2b, s1a, s1b, s2a, s2b;
          load_bf16(x + d, x1a, x1b, m);
          load_bf16(x + half + d, x2a, x2b, m);
          load_bf16(cb.data() + d, c1a, c1b, m);
          load_bf16(cb.data() + half + d, c2a, c2b, m);
          load_bf16(sb.data() + d, s1a, s1b, m);
          load_bf16(sb.data() + half + d, s2a, s2b, m);
          // x * cos, rounded to bf16 (torch's mul), then + rot * sin (its addcmul)
          fVec t1a, t1b, t2a, t2b;
          store_bf16(x + d, x1a * c1a, x1b * c1b, m);
          store_bf16(x + half + d, x2a * c2a, x2b * c2b, m);
          load_bf16(x + d, t1a, t1b, m);
          load_bf16(x + half + d, t2a, t2b, m);
          store_bf16(x + d, t1a + x2a.neg() * s1a, t1b + x2b.neg() * s1b, m);
          store_bf16(x + half + d, t2a + x1a * s2a, t2b + x1b * s2b, m);
        }
      }
    }
  });
}

// gate_up [N, 2I] bf16 ([gate | up] per row) -> [N, I]: bf16(bf16(silu(gate)) * up).
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.scalar_type() == at::kBFloat16 && gu.is_contiguous(), "contiguous bf16 input");
  const int64_t I = gu.size(-1) / 2, N = gu.numel() / (2 * I);
  TORCH_CHECK(I > 0 && gu.size(-1) % 2 == 0, "width ", gu.size(-1), " is not even");
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gu.options());
  const auto* gp = gu.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const fVec one(1.f);
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const at::BFloat16* g = gp + n * 2 * I;
      at::BFloat16* o = op + n * I;
      for (int64_t i = 0; i < I; i += 2 * kF) {
        const int64_t m = std::min(2 * kF, I - i);
        fVec ga, gb, ua, ub;
        load_bf16(g + i, ga, gb, m);
        store_bf16(o + i, ga / (one + ga.neg().exp()), gb / (one + gb.neg().exp()), m);
        load_bf16(o + i, ga, gb, m);  // silu rounded to bf16 (torch's silu), then * up
        load_bf16(g + I + i, ua, ub, m);
        store_bf16(o + i, ga * ua, gb * ub, m);
      }
    }
  });
  return out;
}
"""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cflags() -> list[str]:
    """-march=native, no -ffast-math and no FMA contraction (the kernels must round where torch
    rounds), and ATen's vector code for the capability torch's own kernels run at here."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-march=native", "-ffp-contract=off"]
    if cap in ("AVX512", "AVX2"):
        flags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def kernels():
    """The built extension (add_rms_norm_, rotary_, silu_mul), or None (SHARDSERVE_FUSED_OPS=0,
    or no compiler)."""
    if "mod" in _STATE:  # built (or refused) already: no lock on the per-layer path
        return _STATE["mod"]
    with _LOCK:
        if "mod" not in _STATE:
            mod = None
            if os.environ.get("SHARDSERVE_FUSED_OPS", "1") != "0":
                cap = torch.backends.cpu.get_cpu_capability().lower()  # (ATEN_CPU_CAPABILITY)
                mod = native_build.build(
                    f"shardserve_fused_ops_{cap}", _SOURCE,
                    ["add_rms_norm_", "rotary_", "silu_mul"],
                    cflags=_cflags(), what="fused RMSNorm/rotary/SiLU kernels (plain torch ops)")
            _STATE["mod"] = mod
        return _STATE["mod"]


def active(x: torch.Tensor) -> bool:
    """Whether a forward over x may use the kernels: bf16 CPU inference outside torch.compile,
    and the kernels are built."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and kernels() is not None)


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels take it: contiguous bf16 (a layer swapped in from outside, e.g. a
    quantized one, may return another layout)."""
    if t.dtype == torch.bfloat16 and t.is_contiguous():
        return t
    return t.to(torch.bfloat16).contiguous()


# ---- plain-torch references: the computation models/llama.py does without the kernels ----

def reference_add_rms_norm_(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor,
                            eps: float) -> torch.Tensor:
    """x += delta (if given); returns w * F.rms_norm(x) (fp32 math, rounded to x's dtype)."""
    if delta is not None:
        x.copy_(x + delta)
    return w * F.rms_norm(x, w.shape, None, eps)


def reference_rotary_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """qkv [N, Hall * D]: rotate heads [0, heads) in place, cos/sin [S, D] fp32 tables."""
    from .llama import apply_rope

    x = qkv.view(qkv.shape[0], -1, head_dim)[:, :heads]  # [N, heads, D]
    c = cos[positions].unsqueeze(1).to(qkv.dtype)  # [N, 1, D]
    s = sin[positions].unsqueeze(1).to(qkv.dtype)
    x.copy_(apply_rope(x, c, s))


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
