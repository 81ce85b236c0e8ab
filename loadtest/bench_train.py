"""Benchmark: training tokens/s of a small model at 1x1x1, 2x1x1, 1x2x1 and 1x1x2 (DP x TP x PP)
on this machine's cores, with the share of step time spent in communication. Report-only.

    .venv/bin/python loadtest/bench_train.py [--steps 30] [--family llama]

Each layout trains the same model on the same global batch (the synthetic task) for --steps
steps; tokens/s is the global batch's tokens over the median step time of the last half of the
run (logged by the first DP replica's last stage). "comm" is the time in gradient all-reduces and
the cross-TP/PP gradient-norm reduction (pipeline send/recv and TP collectives inside the
forward and backward are counted in the step, not in comm). Writes loadtest/results/train.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--family", default="llama", choices=("llama", "convlm"))
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for dp, tp, pp in LAYOUTS:
        out = Path(tempfile.mkdtemp(prefix="bench_train_"))
        # every layout in a fresh process (the 1x1x1 run too), so thread pools start equal
        subprocess.run([sys.executable, "-m", "shardserve_server.cli", "train", "--out",
                        str(out), "--family", args.family, "--config", args.config,
                        "--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--steps",
                        str(args.steps), "--batch-size", str(args.batch_size),
                        "--micro-batches", str(4 if pp > 1 else 1), "--seq-len",
                        str(args.seq_len), "--eval-interval", "1000000", "--ckpt-interval",
                        "1000000", "--quiet"], check=True, capture_output=True)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "step_s" in r][args.steps // 2:]
        step_s = statistics.median(r["step_s"] for r in steps)
        comm_s = statistics.median(r["comm_s"] for r in steps)
        tok_s = args.batch_size * args.seq_len / step_s
        rows.append((dp, tp, pp, tok_s, step_s, comm_s / step_s))
        print(f"dp={dp} tp={tp} pp={pp}: {tok_s:,.0f} tok/s, step {step_s * 1000:.1f} ms, "
              f"comm {100 * comm_s / step_s:.1f}%", flush=True)
    base = rows[0][3]
    lines = [f"# Training throughput ({args.family} {args.config}, batch {args.batch_size} x "
             f"{args.seq_len} tokens, {os.cpu_count()} cores, gloo)", "",
             f"Command: `.venv/bin/python loadtest/bench_train.py --steps {args.steps} "
             f"--family {args.family}`  ",
             f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             "| DP x TP x PP | tokens/s | vs 1x1x1 | step ms | comm share |",
             "|---|---|---|---|---|"]
    for dp, tp, pp, tok_s, step_s, share in rows:
        lines.append(f"| {dp}x{tp}x{pp} | {tok_s:,.0f} | {tok_s / base:.2f}x | "
                     f"{step_s * 1000:.1f} | {100 * share:.1f}% |")
    lines += ["", "Report-only: on 2 cores, extra ranks split the same cores, so parallel "
              "layouts measure overhead (process groups, point-to-point, all-reduce), not "
              "speed-up."]
    print(write_results("train", lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
