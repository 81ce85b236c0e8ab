"""Build a C++ CPU kernel for this machine with torch.utils.cpp_extension.load_inline.

One place for what every native kernel of the project needs: g++ at `-O3 -march=native`
with OpenMP (torch's intra-op threads), cached under TORCH_EXTENSIONS_DIR in a folder named
after this CPU's model and flags (`-march=native` code must not run on another CPU kind, and
a machine kind that exposes other flags gets a build of its own). Callers keep a torch path
for when the build fails (no compiler, headers or ninja) or their env var turns it off.
"""

from __future__ import annotations

import hashlib
import logging

import torch

log = logging.getLogger(__name__)


def cpu_tag() -> str:
    """A short hash of this CPU's model and flags (the build is -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = [torch.backends.cpu.get_cpu_capability()]
    return hashlib.sha1("".join(lines).encode()).hexdigest()[:10]


def build_cpu_extension(name: str, source: str, functions: list[str], what: str):
    """The module built from C++ `source` exporting `functions` (named `name`_<cpu tag>), or
    None with one warning line naming `what` when it cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"{name}_{cpu_tag()}", cpp_sources=source, functions=functions,
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, headers or ninja: the caller keeps its torch path
        log.warning("%s not built (%s); using the torch path", what,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
