"""Check the planner's torch decode step against the server's own, on one thread (CPU clock).

    .venv/bin/python loadtest/plan_torch_step_check.py [--steps 8] [--repeats 2] [--out NAME]

The real step: SmolLM2 (random weights) as the torch runner runs a decode step: a flat step
over a PagedKVCache (set_flat_step; the C++ decode attention where built), 1 and 4 decode rows
at cached contexts of 16, 132 and 264 tokens, the median of --steps consecutive steps after as
many untimed ones (a server's steady state: a model that fits the last-level cache keeps more
of its weights there step after step). The plan's step: predict._step_s on one-thread costs
measured in the same run (measure_gemm, measure_nongemm, measure_bandwidth; no engine
overhead, which the model's forward does not hold). The costs and the real steps alternate
(--repeats; medians). Times are the measuring thread's own CPU clock, so other processes on
a shared machine stay out of the figures (they can still slow its caches and memory); this is
a decomposition check, not a speed claim.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import types

import torch
from results_io import cpu_flags, header, write_results

from shardserve_server.engine.paged_cache import PagedKVCache
from shardserve_server.plan import measure
from shardserve_server.plan.costs import MachineCosts, StepOverhead
from shardserve_server.plan.footprint import footprint
from shardserve_server.plan.predict import LayoutChoice, _step_s
from shardserve_sharding.models import LLAMA_CONFIGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = (1, 4)
CONTEXTS = (16, 132, 264)
BLOCK = 16


def real_steps(models: dict, caches: dict, steps: int) -> dict[tuple[str, int, int], float]:
    """(dtype, rows, context) -> median seconds of a flat decode step, one thread."""
    nb = -(-(max(CONTEXTS) + 1) // BLOCK)
    out = {}
    with torch.inference_mode():
        for d, model in models.items():
            cache = caches[d]
            for rows in ROWS:
                tables = torch.arange(rows * nb).reshape(rows, nb)  # [R, blocks]
                for ctx in CONTEXTS:
                    pos = torch.full((rows,), ctx, dtype=torch.long)  # [N]
                    times = []
                    for s in range(2 * steps):  # the first half: untimed steps before
                        t0 = time.thread_time()
                        cache.set_flat_step(tables, pos, torch.ones(rows, dtype=torch.long))
                        model(torch.zeros(1, rows, dtype=torch.long), pos[None], cache,
                              torch.arange(rows))  # [R, V]
                        if s >= steps:
                            times.append(time.thread_time() - t0)
                    out[d, rows, ctx] = statistics.median(times)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per point (median)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternations of the costs and the real steps (median over them)")
    ap.add_argument("--out", default="", help="also write loadtest/results/NAME.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    measure.time = types.SimpleNamespace(perf_counter=time.thread_time)  # its own CPU clock
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    base = measure.synthetic_llama(cfg, lambda p: p.normal_(0, 0.02))
    models = {d: copy.deepcopy(base).to(dt) for d, dt in DTYPES.items()}
    del base
    nb = -(-(max(CONTEXTS) + 1) // BLOCK)
    caches = {d: PagedKVCache(n_layers=cfg.n_layers, num_blocks=max(ROWS) * nb,
                              block_size=BLOCK, n_kv_heads=cfg.n_kv_heads,
                              head_dim=cfg.dim // cfg.n_heads, dtype=dt)
              for d, dt in DTYPES.items()}
    runs = []
    for _ in range(args.repeats):
        runs.append((measure.measure_gemm(cfg, tuple(DTYPES), (1,), rounds=1),
                     measure.measure_nongemm(cfg, tuple(DTYPES), (1,), rounds=1),
                     measure.measure_bandwidth((1,)), real_steps(models, caches, args.steps)))
    fp = footprint("llama", cfg, 1, 1)
    command = " ".join([".venv/bin/python loadtest/plan_torch_step_check.py", *sys.argv[1:]])
    lines = header("The plan's torch decode step vs the server's (1 thread, CPU clock)",
                   command)
    lines += [f"CPU flags: {cpu_flags()}; load average {os.getloadavg()[0]:.1f} (times are the "
              "measuring thread's own CPU clock: other processes may have run)", "",
              "| dtype | rows | context | real step ms | plan ms | plan / real |",
              "|---|---|---|---|---|---|"]
    for key in runs[0][3]:
        d, rows, ctx = key
        real = statistics.median(r[3][key] for r in runs)
        preds = []
        for gemm, nongemm, bw, _ in runs:
            costs = MachineCosts(device="", host_threads=0, memory_per_device_gib=1.0,
                                 gemm_flops=gemm, mem_bw=bw, allreduce_latency_s=0.0,
                                 allreduce_bw=1.0, overhead={"torch": StepOverhead(0.0, 0.0)},
                                 nongemm_s=nongemm, gemm_includes_memory=True)
            preds.append(_step_s(fp, costs, LayoutChoice("torch", d, 1, 1, 1), 1.0, rows, rows,
                                 ctx, rows)[0])
        plan = statistics.median(preds)
        lines.append(f"| {d} | {rows} | {ctx} | {real * 1e3:.1f} | {plan * 1e3:.1f} | "
                     f"{plan / real:.2f} |")
    print("\n".join(lines))
    if args.out:
        write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
