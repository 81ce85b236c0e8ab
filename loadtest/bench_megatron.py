"""Benchmark: reshard a Megatron-LM TP=3 x PP=2 checkpoint of SmolLM2-135M to shardserve TP=1.

    .venv/bin/python loadtest/bench_megatron.py [--workdir /tmp/bench_megatron]

Builds the Megatron checkpoint from the bundled SmolLM2 (imported, fp32) with the test suite's
writer, which follows Megatron-LM's conventions (grouped QKV, [gate; up] fc1 per rank, padded
vocabulary, per-stage layer numbering, tied embeddings). Then, in a fresh child process, runs
`reshard(--source-format megatron --tokenizer GGUF)` and reports wall time and peak RSS above
the RSS right after `import torch`. Megatron-LM's own converter loads every rank file at once:
the sum of all rank files is that approach's lower bound on memory, reported next to ours.
Writes loadtest/results/megatron.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
def hwm():  # peak RSS of this process image (VmHWM resets at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import torch
base = hwm()
from shardserve_sharding.reshard import reshard
t0 = time.perf_counter()
rep = reshard(sys.argv[1], sys.argv[2], tp=1, source_format="megatron", tokenizer=sys.argv[3])
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "base_mb": base, "peak_mb": hwm(),
                  "written_mb": rep.bytes_written / 1e6}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_megatron"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests" / "sharding"))
    from megatron_writer import write_megatron

    from shardserve_server.cli import bundled_gguf
    from shardserve_sharding.checkpoint.io import load_full_state_dict
    from shardserve_sharding.importers import import_model
    from shardserve_sharding.models.llama import LlamaConfig

    gguf = bundled_gguf()
    imported = work / "smollm2"
    if not (imported / "manifest.json").is_file():
        import_model(gguf, imported)
    mg = work / "megatron_tp3_pp2"
    if not (mg / "latest_checkpointed_iteration.txt").is_file():
        manifest, state = load_full_state_dict(imported)
        cfg = LlamaConfig.from_dict(manifest.config)
        write_megatron(mg, state, cfg, tp=3, pp=2, style="core", divisible=128, iteration=1000)
        del state
    rank_bytes = sum(p.stat().st_size for p in mg.rglob("model_optim_rng.pt"))
    runs = []
    for i in range(3):
        dst = work / f"out{i}"
        subprocess.run(["rm", "-rf", str(dst)], check=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(mg), str(dst), str(gguf)],
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["seconds"])
    med = runs[1]
    above = med["peak_mb"] - med["base_mb"]
    lines = [
        "# Megatron-LM TP=3 x PP=2 -> shardserve TP=1 (SmolLM2-135M, fp32)", "",
        "Command: `.venv/bin/python loadtest/bench_megatron.py`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}", "",
        "| | wall s (median of 3) | peak RSS above `import torch` (MB) |",
        "|---|---|---|",
        f"| shardserve reshard (mmap, a few tensors resident at a time) | {med['seconds']:.2f} | "
        f"{above:.0f} |",
        f"| Megatron's approach: load every rank file (lower bound = their sum) | - | "
        f"{rank_bytes / 1e6:.0f} |", "",
        f"Output {med['written_mb']:.0f} MB; runs: "
        + ", ".join(f"{r['seconds']:.2f} s / {r['peak_mb'] - r['base_mb']:.0f} MB" for r in runs),
    ]
    print(write_results("megatron", lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
