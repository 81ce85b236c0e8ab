"""SmolLM2's GEMMs on this CPU: torch's bf16 F.linear against oneDNN over a packed bf16 weight.

    .venv/bin/python loadtest/bench_cpu_gemm.py [--threads 1] [--rows 1,32,132,512] [--repeats 5]

For each weight shape of SmolLM2-135M (fused QKV, wo, fused gate/up, down, lm_head) and each
row count, the best of --repeats timings of 10 calls, each path in turn; then the whole model's
GEMM time per forward (30 layers + lm_head). With one thread the clock is the thread's CPU time,
which other processes on the machine barely disturb; with more, wall time. The weights stay in
cache between calls here, so the figures are a floor for a real forward, which streams them.
Decides nothing by itself: the packed path is the default for GEMMs of at most
cpu_gemm.PACKED_BF16_MAX_ROWS rows (SHARDSERVE_PACKED_BF16=1: all, 0: none), set from whole
decode steps (loadtest/profile_step.py), see shardserve_sharding/models/cpu_gemm.py and
loadtest/results/engine.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from results_io import cpu_flags

SHAPES = ((576, 960, 30), (576, 576, 30), (576, 3072, 30), (1536, 576, 30), (576, 49152, 1))
"""(in, out, times per forward) of SmolLM2-135M's weights."""


def best_ms(fn, clock, repeats: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(10):
            fn()
        runs.append((clock() - t0) / 10 * 1e3)
    return min(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--rows", default="1,32,132,512", help="comma-separated row counts (M)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per case (best is kept)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    print(f"cpu: {cpu_flags()}  torch {torch.__version__}  threads {a.threads}  "
          f"clock {'thread CPU time' if a.threads == 1 else 'wall'}")
    print("| rows | in | out | F.linear ms | packed ms | ratio |")
    print("|---|---|---|---|---|---|")
    for m in (int(r) for r in a.rows.split(",")):
        plain_total = packed_total = 0.0
        for k, n, times in SHAPES:
            x = torch.randn(m, k).bfloat16()  # [M, in]
            w = torch.randn(n, k).bfloat16()  # [out, in]
            wp = torch.ops.mkldnn._reorder_linear_weight(w, 16)  # opaque packed layout
            plain = best_ms(lambda x=x, w=w: F.linear(x, w), clock, a.repeats)
            packed = best_ms(lambda x=x, wp=wp: torch.ops.mkldnn._linear_pointwise(
                x, wp, None, "none", [], ""), clock, a.repeats)
            plain_total += plain * times
            packed_total += packed * times
            print(f"| {m} | {k} | {n} | {plain:.3f} | {packed:.3f} | {plain / packed:.2f} |")
        print(f"| {m} | model | per forward | {plain_total:.1f} | {packed_total:.1f} | "
              f"{plain_total / packed_total:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
