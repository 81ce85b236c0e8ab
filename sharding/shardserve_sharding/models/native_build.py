"""Build a small C++ extension for this CPU once, or say why not (shared by the native kernels).

The kernels are compiled with `-march=native`, so a build must never be loaded on another CPU
kind: the extension's name carries a short hash of this CPU's model and flags, and torch's
cpp_extension caches it under TORCH_EXTENSIONS_DIR in a folder of that name (plus a hash of
the source) (g++, 20-90 s on
first use, then loaded in well under a second). Where there is no compiler, headers or ninja,
`build` logs one warning and returns None, and the caller keeps its plain-torch path.

Users: server/.../engine/decode_attention.py (decode attention over the paged KV pool),
models/fused_ops.py (residual add + RMSNorm, rotary, SiLU x up), models/bf16_gemv.py (bf16
GEMV for decode steps of few rows) and quant/cpu_kernel.py (int4 / int8 weight-only GEMV for
decode).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def cpu_tag() -> str:
    """A short hash of this CPU's model and flags (the builds are -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = [torch.backends.cpu.get_cpu_capability()]
    return hashlib.sha1("".join(lines).encode()).hexdigest()[:10]


AVX512_HSUM16 = r"""
// 128-bit lane L of the result: [sum of a's lane L, b's, c's, d's].
static inline __m512 hsum4x(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
}

// Lane i of the result: the sum of v[i]'s 16 lanes.
static inline __m512 hsum16(const __m512* v) {
  const __m512 w0 = hsum4x(v[0], v[1], v[2], v[3]), w1 = hsum4x(v[4], v[5], v[6], v[7]);
  const __m512 w2 = hsum4x(v[8], v[9], v[10], v[11]), w3 = hsum4x(v[12], v[13], v[14], v[15]);
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x44),
                                   _mm512_shuffle_f32x4(w0, w1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w2, w3, 0x44),
                                   _mm512_shuffle_f32x4(w2, w3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88),
                       _mm512_shuffle_f32x4(s01, s23, 0xDD));
}
"""
"""C++ for kernel sources built with AVX-512 (paste it after <immintrin.h>): `hsum16(v)`, the
16 horizontal sums of 16 fp32 vectors as one vector, in one transpose-add tree (45
instructions instead of 16 x 8). Used by the decode attention's scores and the bf16 GEMV."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo's `flags` line; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(name: str, source: str, functions: Sequence[str], *, cflags: Sequence[str],
          what: str):
    """load_inline(source) as `{name}_{cpu_tag()}_{source hash}` with `cflags` (plus OpenMP,
    which binds to torch's own runtime); returns the module, or None after a warning naming
    `what` falls back (no compiler, headers or ninja; a compile error)."""
    # the source's hash too: two checkouts (or branches) with different sources each keep
    # their own build instead of rebuilding over each other's in the shared cache folder
    src = hashlib.sha1("\0".join([source, *functions, *cflags]).encode()).hexdigest()[:8]
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"{name}_{cpu_tag()}_{src}", cpp_sources=source, functions=list(functions),
            extra_cflags=[*cflags, "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, headers or ninja: the caller keeps its torch path
        log.warning("%s not built (%s)", what,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
