"""Check the planner's ONNX decode step against the real one, on one thread (CPU clock).

    .venv/bin/python loadtest/plan_onnx_step_check.py [--onnx DIR] [--rounds 3] [--repeats 3]
        [--out NAME]

The real step: OnnxStepRuntime (the ONNX backend's forward) over an exported SmolLM2 (DIR,
default validate_plan.py's export in the bench cache) at 1, 2 and 4 decode rows and cached
contexts of 16, 132 and 264 tokens. The plan's step: predict._step_s on one-thread costs
measured now (measure_gemm_onnx over the model's weight bytes, measure_bandwidth,
measure_onnx_attention; no engine overhead, which the runtime's forward does not hold), once
as today's plan costs it (the measured attention; no bandwidth floor under GEMM rates timed
over the model's bytes) and once with the formula used before 2026-12-06 11:00 on the same
tables (the keys' and values' bytes over the bandwidth; GEMMs floored at their weight bytes
over the bandwidth). The costs and the real steps alternate (--repeats; medians). Times are
the measuring thread's own CPU clock, so other processes on a shared machine stay out of the
figures (they can still slow its caches and memory); this is a decomposition check, not a
speed claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from results_io import cpu_flags, header, write_results

from shardserve_server.plan import measure
from shardserve_server.plan.costs import MachineCosts, StepOverhead
from shardserve_server.plan.footprint import footprint
from shardserve_server.plan.predict import LayoutChoice, _step_s
from shardserve_sharding.models import LLAMA_CONFIGS

DEFAULT_ONNX = Path.home() / ".cache/shardserve/bench/smollm2-135m-fp32-onnx"
ROWS = (1, 2, 4)
CONTEXTS = (16, 132, 264)


def real_steps(onnx_dir: Path, rounds: int) -> dict[tuple[int, int], float]:
    """(rows, context) -> median seconds of OnnxStepRuntime.forward, one thread."""
    from shardserve_sharding.onnx_export.runtime import OnnxStepRuntime

    bs = 16
    nb = -(-(max(CONTEXTS) + 1) // bs)
    rt = OnnxStepRuntime(onnx_dir, kv_cache_tokens=max(ROWS) * nb * bs, block_size=bs,
                         max_slots=max(ROWS), threads=1)
    samples: dict[tuple[int, int], list[float]] = {}
    for r in range(rounds + 1):  # round 0 warms; rounds interleave the points
        for rows in ROWS:
            tables = np.arange(rows * nb, dtype=np.int32).reshape(rows, nb)  # [B, blocks]
            for ctx in CONTEXTS:
                args = (np.full((rows, 1), 5, np.int64),  # tokens [B, 1]
                        np.full((rows, 1), ctx, np.int64),  # positions [B, 1]
                        np.ones(rows, np.int64), np.zeros(rows, np.int64), tables)
                t0 = time.thread_time()
                rt.forward(*args)  # [B, V]
                if r:
                    samples.setdefault((rows, ctx), []).append(time.thread_time() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", default=str(DEFAULT_ONNX),
                    help="an exported SmolLM2 (shardserve export-onnx) to time")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per point (median)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternations of the costs and the real steps (median over them)")
    ap.add_argument("--out", default="", help="also write loadtest/results/NAME.md")
    args = ap.parse_args()
    onnx_dir = Path(args.onnx)
    if not (onnx_dir / "onnx_model.json").is_file():
        print(f"plan_onnx_step_check: {onnx_dir}: no exported model (onnx_model.json)",
              file=sys.stderr)
        return 2
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    measure.time = types.SimpleNamespace(perf_counter=time.thread_time)  # its own CPU clock
    # the costs and the real steps alternate, so a burst of load lands on both sides alike
    runs: list[tuple[dict, dict, dict, dict]] = []
    with tempfile.TemporaryDirectory(prefix="plan-onnx-check-") as d:
        for _ in range(args.repeats):
            runs.append((measure.measure_gemm_onnx(cfg, (1,), Path(d), rounds=1)[1],
                         measure.measure_onnx_attention(cfg, (1,), Path(d), rounds=1),
                         measure.measure_bandwidth((1,)), real_steps(onnx_dir, args.rounds)))

    def med(i: int) -> dict:
        return {k: statistics.median(r[i][k] for r in runs) for k in runs[0][i]}

    gemm, attn, bw, real = {1: med(0)}, med(1), med(2), med(3)
    zero = StepOverhead(0.0, 0.0)
    new = MachineCosts(device=measure.cpu_description(), host_threads=0,
                       memory_per_device_gib=1.0, gemm_flops={"fp32": gemm}, mem_bw=bw,
                       allreduce_latency_s=0.0, allreduce_bw=1.0, overhead={"onnx": zero},
                       attn_token_s={"onnx": {"fp32": attn}}, gemm_includes_memory=True)
    old = dataclasses.replace(new, attn_token_s={}, gemm_includes_memory=False)
    fp = footprint("llama", cfg, 1, 1)
    lay = LayoutChoice("onnx", "fp32", 1, 1, 1)
    command = " ".join([".venv/bin/python loadtest/plan_onnx_step_check.py", *sys.argv[1:]])
    lines = header("The plan's ONNX decode step vs the real one (1 thread, CPU clock)", command)
    lines += [f"CPU flags: {cpu_flags()}; load average {os.getloadavg()[0]:.1f} (times are the "
              "measuring thread's own CPU clock: other processes may have run)", "",
              f"One-thread costs measured in this run: bandwidth {bw[1] / 1e9:.1f} GB/s, ONNX "
              f"attention {attn[1] * 1e9:.0f} ns a row, cached token and layer; GEMM GFLOP/s "
              + ", ".join(f"{r} rows {v / 1e9:.1f}" for r, v in sorted(gemm[1].items())), "",
              "| rows | context | real step ms | plan ms | plan / real | old formula ms "
              "| old / real |", "|---|---|---|---|---|---|---|"]
    for (rows, ctx), t in sorted(real.items()):
        p_new = _step_s(fp, new, lay, 1.0, rows, rows, ctx, rows)[0]
        p_old = _step_s(fp, old, lay, 1.0, rows, rows, ctx, rows)[0]
        lines.append(f"| {rows} | {ctx} | {t * 1e3:.1f} | {p_new * 1e3:.1f} | {p_new / t:.2f} |"
                     f" {p_old * 1e3:.1f} | {p_old / t:.2f} |")
    print("\n".join(lines))
    if args.out:
        write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
