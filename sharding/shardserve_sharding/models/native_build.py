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
