"""Check the planner's step decomposition against the model's real forward, on one thread.

    .venv/bin/python loadtest/plan_step_check.py [--tokens 1,100,300] [--rounds 3] [--out NAME]

The plan costs a torch step as its GEMMs (measure.measure_gemm's rates at the model's shapes,
the output projection on the sampled row) plus the forward outside them
(measure.measure_nongemm). This script measures both tables on ONE thread and times SmolLM2's
real eager forward (random weights, no cache, logits of the last token) at the same token
counts, and prints planner / real per dtype and token count. Every time is the measuring
thread's own CPU clock (time.thread_time), so other processes on a shared machine do not
enter the figures (they can still slow a core's caches and memory); nothing here needs a
quiet machine, and nothing here is a speed claim: the ratio is what it shows.
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

from shardserve_server.plan import measure
from shardserve_server.plan.costs import _interp_log
from shardserve_sharding.models import LLAMA_CONFIGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,100,300", help="comma-separated tokens per forward")
    ap.add_argument("--rounds", type=int, default=3, help="timed forwards per point (median)")
    ap.add_argument("--out", default="", help="also write loadtest/results/NAME.md")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    torch.set_num_threads(1)
    measure.time = types.SimpleNamespace(perf_counter=time.thread_time)  # its own CPU clock
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    gemm = measure.measure_gemm(cfg, tuple(DTYPES), (1,))
    nongemm = measure.measure_nongemm(cfg, tuple(DTYPES), (1,))
    body = cfg.n_layers * sum(o * i for o, i in measure._layer_shapes(cfg))  # per token
    head = cfg.vocab_size * cfg.dim
    base = measure.synthetic_llama(cfg, lambda p: p.normal_(0, 0.02))
    rows = []
    for d, dt in DTYPES.items():
        model = copy.deepcopy(base).to(dt)
        ng = nongemm[d][1]
        for t in tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, t))  # [1, T]
            pos = torch.arange(t).unsqueeze(0)  # [1, T]
            times = []
            with torch.no_grad():
                for r in range(args.rounds + 1):  # round 0 warms
                    t0 = time.thread_time()
                    model(ids, pos, None, torch.tensor([t - 1]))  # [1, V]
                    if r:
                        times.append(time.thread_time() - t0)
            real = statistics.median(times)
            g = 2 * body * t / _interp_log(gemm[d][1], t) + 2 * head / _interp_log(gemm[d][1], 1)
            n = ng[1] + (ng[128] - ng[1]) * (t - 1) / 127
            rows.append((d, t, real, g, n))
    command = " ".join([".venv/bin/python loadtest/plan_step_check.py", *sys.argv[1:]])
    lines = header("The plan's step decomposition vs the real forward (1 thread, CPU clock)",
                   command)
    lines += [f"CPU flags: {cpu_flags()}; load average {os.getloadavg()[0]:.1f} (times are the "
              "measuring thread's own CPU clock: other processes may have run)", "",
              "| dtype | tokens | real forward ms | plan GEMMs ms | plan outside GEMMs ms | "
              "plan / real |", "|---|---|---|---|---|---|"]
    for d, t, real, g, n in rows:
        lines.append(f"| {d} | {t} | {real * 1e3:.1f} | {g * 1e3:.1f} | {n * 1e3:.1f} | "
                     f"{(g + n) / real:.2f} |")
    print("\n".join(lines))
    if args.out:
        write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
