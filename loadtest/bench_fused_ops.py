"""Per-call CPU time of each fused kernel against the torch ops it replaces (SmolLM2 shapes).

    .venv/bin/python loadtest/bench_fused_ops.py [--rows 1,8,32] [--calls 2000] [--threads 1]

Kernels from sharding/shardserve_sharding/models/fused_ops.py, references are its
`reference_*` functions (the torch path of models/llama.py). Shapes: residual 576 wide, QKV 15
heads of 64 (12 rotated), gate/up 2 x 1536. Median of 5 rounds of --calls calls, process CPU
time (steady on a shared machine with one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import cpu_flags  # noqa: E402

from shardserve_sharding.models import fused_ops  # noqa: E402
from shardserve_sharding.models.llama import rope_tables  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        rounds.append((time.process_time() - t0) / calls)
    return 1e6 * statistics.median(rounds)


def row_cells(k, r: int, cos: torch.Tensor, sin: torch.Tensor, calls: int) -> list[str]:
    """'kernel / torch us' for the three kernels at r tokens."""
    x, d = torch.randn(r, 576).bfloat16(), torch.randn(r, 576).bfloat16()  # [R, dim]
    w = torch.randn(576).bfloat16()
    qkv = torch.randn(r, 15 * 64).bfloat16()  # [R, (H + 2 Hkv) D]
    pos = torch.randint(0, 8192, (r,))
    gate_up = torch.randn(r, 2 * 1536).bfloat16()  # [R, 2I]
    pairs = [
        (lambda: k.add_rms_norm_(x, d, w, 1e-5),
         lambda: fused_ops.reference_add_rms_norm_(x, d, w, 1e-5)),
        (lambda: k.rotary_(qkv, pos, cos, sin, 12, 64),
         lambda: fused_ops.reference_rotary_(qkv, pos, cos, sin, 12, 64)),
        (lambda: k.silu_mul(gate_up), lambda: fused_ops.reference_silu_mul(gate_up)),
    ]
    return [f"{per_call_us(f, calls):.1f} / {per_call_us(g, calls):.1f} us" for f, g in pairs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32", help="comma-separated token counts")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing round")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    k = fused_ops.kernels()
    if k is None:
        print("the fused kernels are not built here (disabled or no compiler)")
        return 1
    cos, sin = rope_tables(64, 8192, 100000.0)  # [S, D] fp32
    print(f"cpu: {cpu_flags()}  torch {torch.__version__}  threads {a.threads}")
    print("| rows | add + RMSNorm: kernel / torch | rotary | SiLU x up |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for r in (int(x) for x in a.rows.split(",")):
            print(f"| {r} | " + " | ".join(row_cells(k, r, cos, sin, a.calls)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
