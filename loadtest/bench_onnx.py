"""Benchmark: ONNX Runtime backend against the torch backend on SmolLM2-135M (fp32), and
R replicas x 1 thread against one replica x 1 thread.

    .venv/bin/python loadtest/bench_onnx.py [--new-tokens 64] [--workdir /tmp/bench_onnx]

Each measurement runs in its own process (torch and ONNX Runtime thread pools would otherwise
fight over the cores): greedy decode through the step runners (the exact forward the workers
run: ForwardPlan -> paged cache), batch 1 and 32 sequences, 2 threads; then the replica
scaling through AsyncEngine (R = 1 and 2 replicas, 1 thread each, 32 concurrent requests).
llama.cpp: with --llamacpp-python (the python of a venv holding llama-cpp-python, see
llamacpp_peer.py; it takes ~10 minutes to build, so CI never does) the same run measures
llama.cpp on an F32 GGUF of the same weights through its batch API, batch 1 and 32, 2 threads;
without it, ../shared/FACTS.md's figure (about 44 tok/s at batch 1) is quoted for reference
only. Writes loadtest/results/onnx.md.
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

RUNNER = r"""
import json, sys, time, numpy as np, torch
backend, model_dir = sys.argv[1], sys.argv[2]
batch, new, threads = (int(x) for x in sys.argv[3:6])
torch.set_num_threads(threads)
bs, prompt = 16, 16
nb = -(-(prompt + new + 1) // bs)
tables = torch.arange(batch * nb).view(batch, nb)
if backend == "onnx":
    from shardserve_sharding.onnx_export.runtime import OnnxStepRuntime
    rt = OnnxStepRuntime(model_dir, kv_cache_tokens=batch * nb * bs, block_size=bs,
                         threads=threads, spin=threads > 1)  # as `serve` on these cores
    fwd = lambda t, p, n, li: torch.from_numpy(
        rt.forward(t.numpy(), p.numpy(), n.numpy(), li.numpy(), tables.numpy()))
else:
    from shardserve_sharding.sharded_load import load_sharded_model
    from shardserve_sharding.tp.comm import ThreadGroup
    from shardserve_server.engine.runner import CacheGeometry, ForwardPlan, ModelRunner
    model = load_sharded_model(model_dir, ThreadGroup(1).comm(0), dtype=torch.float32)
    runner = ModelRunner(model, CacheGeometry(batch * nb * bs, bs, batch), torch.float32)
    fwd = lambda t, p, n, li: runner.forward(ForwardPlan(t, p, n, li, tables))
g = torch.Generator().manual_seed(0)
tok = torch.randint(0, 49152, (batch, prompt), generator=g)
pos = torch.arange(prompt).expand(batch, prompt).contiguous()
with torch.inference_mode():
    lg = fwd(tok, pos, torch.full((batch,), prompt), torch.full((batch,), prompt - 1))
    t0 = time.perf_counter()
    for i in range(new):
        nxt = lg.argmax(-1)[:, None]
        lg = fwd(nxt, torch.full((batch, 1), prompt + i), torch.ones(batch, dtype=torch.long),
                 torch.zeros(batch, dtype=torch.long))
    dt = time.perf_counter() - t0
print(json.dumps({"tok_s": batch * new / dt}))
"""

REPLICAS = r"""
import asyncio, json, sys, time
from shardserve_server.engine.async_engine import AsyncEngine
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams
from shardserve_server.workers.worker import WorkerConfig
async def main(model_dir, replicas, n, new):
    eng = AsyncEngine(WorkerConfig(model_dir, backend="onnx", threads=1, kv_cache_tokens=8192,
                                   max_batch_size=32), replicas=replicas)
    await eng.start()
    reqs = [GenerationRequest(tuple(range(100 + i, 116 + i)), SamplingParams(temperature=0.0),
                              StoppingParams(new, ignore_eos=True), f"r{i}") for i in range(n)]
    t0 = time.perf_counter()
    res = await asyncio.gather(*(eng.submit(r).result() for r in reqs))
    dt = time.perf_counter() - t0
    await eng.shutdown()
    print(json.dumps({"tok_s": sum(len(r.token_ids) for r in res) / dt}))
if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_onnx"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--llamacpp-python", help="python of a venv with llama-cpp-python")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each measurement, interleaved; medians are reported")
    args = ap.parse_args()
    from shardserve_server.cli import bundled_gguf
    from shardserve_sharding.importers import import_model
    from shardserve_sharding.onnx_export.export import export_onnx
    from shardserve_sharding.onnx_export.llama_graph import GRAPH_VERSION

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, onnx_dir = work / "smollm2", work / "smollm2-onnx"
    if not (ckpt / "manifest.json").is_file():
        import_model(bundled_gguf(), ckpt)
    meta = onnx_dir / "onnx_model.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("graph") != GRAPH_VERSION:
        export_onnx(ckpt, onnx_dir, overwrite=True)  # absent, or from an older exporter
    gguf_f32 = None
    if args.llamacpp_python:
        from llamacpp_peer import f32_gguf

        gguf_f32 = f32_gguf(bundled_gguf(), work / "smollm2-f32.gguf")
    rows = []
    for batch in (1, 32):
        new = args.new_tokens if batch == 1 else max(16, args.new_tokens // 2)
        os_, ts, lcs = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit all alike
            os_.append(child(RUNNER, "onnx", str(onnx_dir), str(batch), str(new), "2")["tok_s"])
            ts.append(child(RUNNER, "torch", str(ckpt), str(batch), str(new), "2")["tok_s"])
            if gguf_f32 is not None:
                out = subprocess.run(
                    [args.llamacpp_python, str(Path(__file__).with_name("llamacpp_peer.py")),
                     str(gguf_f32), str(batch), str(new), "2"],
                    check=True, capture_output=True, text=True)
                lcs.append(json.loads(out.stdout.strip().splitlines()[-1])["tok_s"])
            print(f"batch {batch}: onnx {os_[-1]:.1f} tok/s, torch {ts[-1]:.1f} tok/s, "
                  f"llama.cpp F32 {lcs[-1] if lcs else None}", flush=True)
        o, t = statistics.median(os_), statistics.median(ts)
        lc = statistics.median(lcs) if lcs else None
        rows.append((batch, o, t, lc, os_, lcs))
    # replica scaling with 1 thread each: 32 requests, 32 new tokens
    r1s, r2s = [], []
    for _ in range(args.repeats):
        r1s.append(child(REPLICAS, str(onnx_dir), "1", "32", "32")["tok_s"])
        r2s.append(child(REPLICAS, str(onnx_dir), "2", "32", "32")["tok_s"])
        print(f"replicas: 1 x 1 thread {r1s[-1]:.1f} tok/s, 2 x 1 thread {r2s[-1]:.1f} tok/s",
              flush=True)
    r1, r2 = statistics.median(r1s), statistics.median(r2s)
    cmd = f".venv/bin/python loadtest/bench_onnx.py --repeats {args.repeats}" + (
        " --llamacpp-python /tmp/llamacpp-venv/bin/python" if gguf_f32 else "")
    lines = ["# ONNX Runtime backend vs torch backend (SmolLM2-135M, fp32)", "",
             f"Command: `{cmd}`  ",
             f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
             f"{os.cpu_count()} cores", "",
             "| sequences | ONNX Runtime tok/s | torch tok/s | ONNX / torch | llama.cpp F32 "
             "tok/s | ONNX / llama.cpp |", "|---|---|---|---|---|---|"]
    for batch, o, t, lc, ox, lx in rows:
        # also the median of per-repeat ratios: each pair ran back to back, under one load
        if lc:
            ratios = [a / b for a, b in zip(ox, lx, strict=True)]
            lcs = f"{lc:.1f} | {o / lc:.2f}x (per-repeat median {statistics.median(ratios):.2f}x)"
        else:
            lcs = "not run | -"
        lines.append(f"| {batch} | {o:.1f} | {t:.1f} | {o / t:.2f}x | {lcs} |")
    lines += ["", "Every run (tok/s, in order): " + "; ".join(
        f"batch {b}: ONNX {', '.join(f'{x:.1f}' for x in ox)}"
        + (f", llama.cpp {', '.join(f'{x:.1f}' for x in lx)}" if lx else "")
        for b, _, _, _, ox, lx in rows)
        + f"; replicas 1 x 1 {', '.join(f'{x:.1f}' for x in r1s)}, 2 x 1 "
        f"{', '.join(f'{x:.1f}' for x in r2s)}."]
    lines += ["", "| replicas x threads | tok/s (32 requests x 32 tokens) | vs 1 replica |",
              "|---|---|---|", f"| 1 x 1 | {r1:.1f} | 1.00x |",
              f"| 2 x 1 | {r2:.1f} | {r2 / r1:.2f}x (target >= 1.6x) |", "",
              f"Medians of {args.repeats} interleaved runs. "
              "Decode only (prefill excluded), greedy, 2 threads; llama.cpp through its batch "
              "API (llama_decode of all sequences per step) on an F32 GGUF of the same weights. "
              "Target: ONNX batch 1 >= 1.0x llama.cpp F32."]
    if gguf_f32 is None:
        lines.append("llama.cpp was not run: ../shared/FACTS.md quotes about 44 tok/s at batch "
                     f"1; ONNX batch 1 here is {rows[0][1] / 44:.2f}x that figure.")
    print(write_results("onnx", lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
