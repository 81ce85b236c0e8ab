"""Python cost of one linear-layer call: a SmolLM2-shaped bf16 layer (576 -> 1536) called as
the model calls it (module -> cpu_gemm.cpu_linear -> kernel), against the kernel alone.

    .venv/bin/python loadtest/bench_linear_call.py [--rows 1 32] [--calls 3000]

Prints, per row count, the best-of-5 mean CPU time of a module call, of the bare kernel that
call ends in (the packed bf16 op or F.linear, whichever cpu_linear picks), and their
difference: the per-GEMM overhead a forward pays 121 times. One thread; A/B two checkouts by
running it with each one's packages first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import cpu_flags  # noqa: E402

from shardserve_sharding.models import cpu_gemm  # noqa: E402
from shardserve_sharding.models.llama import Linear  # noqa: E402


def _best_mean_us(fn, calls: int) -> float:
    """Best of 5 means of `calls` calls, in microseconds of process CPU time."""
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls)
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="rows per GEMM")
    ap.add_argument("--calls", type=int, default=3000, help="calls per timed mean")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lin = Linear(576, 1536, bias=False).to(torch.bfloat16)
    print(f"cpu: {cpu_flags()}  torch {torch.__version__}  threads 1  cpu_gemm "
          f"{Path(cpu_gemm.__file__).resolve()}")
    with torch.inference_mode():
        for rows in a.rows:
            x = torch.randn(1, rows, 576, dtype=torch.bfloat16)  # [1, R, in]
            for _ in range(50):
                lin(x)
            if cpu_gemm.use_packed_bf16(x, lin.weight):
                packed = cpu_gemm.packed_bf16(lin, lin.weight)
                kernel = functools.partial(torch.ops.mkldnn._linear_pointwise, x, packed, None,
                                           "none", [], "")
            else:
                kernel = functools.partial(F.linear, x, lin.weight)
            module = _best_mean_us(functools.partial(lin, x), a.calls)
            bare = _best_mean_us(kernel, a.calls)
            print(f"rows {rows}: module call {module:.1f} us, kernel alone {bare:.1f} us, "
                  f"overhead {module - bare:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
