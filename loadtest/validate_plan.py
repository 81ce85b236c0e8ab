"""Validate `shardserve plan`: predicted vs measured tok/s, TTFT and ITL on this machine.

    .venv/bin/python loadtest/validate_plan.py [--costs FILE | (measures first)]
        [--streams 1,4] [--seconds 12] [--configs all|NAME,...]

1. The machine's costs: `shardserve plan --measure --devices D` (1-2 min; D = the largest
   layout's ranks, so the TP layer loop covers it) unless --costs names a file.
2. Each configuration in turn, alone on the machine with the client: `shardserve serve` of
   SmolLM2-135M (the bundled model; ONNX exported once into the bench cache) at the layout,
   then for each stream count a closed-loop window of the peer benchmark's harness
   (bench_vs_vllm.py: distinct ~100-token prompts, 64 new tokens, greedy, EOS ignored, the
   first 20% not counted): tok/s, TTFT p50, ITL p50.
3. The planner's prediction for the same layout, workload and prompt length (predict.py, with
   --devices = the layout's ranks: on this host ranks share its cores, as the costs say; and
   in_phase: the harness's streams have equal lengths).
4. loadtest/results/plan.md: predicted, measured and predicted / measured per configuration
   and stream count, the target (every ratio within 0.75..1.25) counted, every run listed,
   and a digest of each server's request log (server_log.py: queueing and step times).
`loadtest/replan.py` re-predicts such a file offline from its stored costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_vs_vllm
import server_log
from bench_vs_vllm import (
    CACHE,
    SKIP,
    Process,
    bundled_checkpoint,
    grpc_client,
    loadavg,
    make_prompts,
    run_window,
    wait_grpc_ready,
    wait_listening,
)
from results_io import cpu_flags, header, write_results
from stream_stats import window_stats

# name -> (backend, dtype, tp, replicas)
CONFIGS: dict[str, tuple[str, str, int, int]] = {
    "torch-bf16-tp1": ("torch", "bf16", 1, 1),
    "torch-fp32-tp1": ("torch", "fp32", 1, 1),
    "torch-fp32-tp3": ("torch", "fp32", 3, 1),
    "torch-bf16-tp3": ("torch", "bf16", 3, 1),
    "torch-bf16-tp1-x2": ("torch", "bf16", 1, 2),
    "onnx-fp32-x1": ("onnx", "fp32", 1, 1),
    "onnx-fp32-x2": ("onnx", "fp32", 1, 2),
}
TOLERANCE = 0.25


def onnx_export(model: Path) -> Path:
    from shardserve_sharding.onnx_export.export import export_onnx
    from shardserve_sharding.onnx_export.llama_graph import GRAPH_VERSION

    out = CACHE / f"{model.name}-onnx"
    meta = out / "onnx_model.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("graph") != GRAPH_VERSION:
        print(f"exporting {model} to ONNX -> {out}", flush=True)
        export_onnx(model, out, overwrite=True)
    return out


def serve(model: Path, onnx: Path, cfg: tuple[str, str, int, int], run: int) -> tuple:
    backend, dtype, tp, reps = cfg
    cmd = [sys.executable, "-m", "shardserve_server.cli", "serve",
           "--model", str(onnx if backend == "onnx" else model), "--backend", backend,
           "--dtype", dtype, "--tp", str(tp), "--replicas", str(reps), "--port", "0",
           "--metrics-port", "-1", "--no-verify"]
    proc = Process(cmd, dict(os.environ), CACHE / "logs" / f"validate-plan-{run}.log")
    try:
        target = wait_listening(proc, 600)
        asyncio.run(wait_grpc_ready(proc, target, 600))
    except BaseException:
        proc.stop()
        raise
    return proc, target


async def measure(target: str, prompts: list[str], streams: list[int], seconds: float,
                  warmup: float, new_tokens: int) -> list[tuple[int, object, float]]:
    from shardserve_client import AsyncClient

    client = AsyncClient(target)
    send = grpc_client(client)
    out = []
    try:
        used = 0
        if warmup > 0:
            _, _, _, n = await run_window(send, prompts, used, max(streams), warmup)
            used += n
        for s in streams:
            load = loadavg()
            reqs, t0, t1, n = await run_window(send, prompts, used, s, seconds)
            used += n
            out.append((s, window_stats(reqs, t0, t1, SKIP, new_tokens), max(load, loadavg())))
    finally:
        await client.close()
    return out


def predicted(costs: Path | object, cfg: tuple[str, str, int, int], streams: int,
              prompt_tokens: int, new_tokens: int) -> dict:
    """The planner's tok/s, TTFT and ITL for one configuration; `costs` is a costs file or a
    loaded MachineCosts (loadtest/replan.py re-predicts from a results file's stored costs)."""
    from shardserve_server.plan import costs as plan_costs
    from shardserve_server.plan.predict import LayoutChoice, Workload, predict, resolve_model

    backend, dtype, tp, reps = cfg
    lay = LayoutChoice(backend, dtype, tp, 1, reps)
    # the harness's closed-loop streams have equal lengths (EOS ignored): in phase
    work = Workload(streams=streams, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                    in_phase=True)
    if not isinstance(costs, plan_costs.MachineCosts):
        costs = plan_costs.load(costs)
    (p,) = predict(resolve_model("smollm2-135m"), costs, lay.devices, work, [lay])
    if not p.valid:
        raise SystemExit(f"{lay.name}: the planner calls it invalid: {p.why}")
    return {"tok_s": p.tok_s, "ttft_ms": p.ttft_ms, "itl_ms": p.itl_ms}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--costs", help="costs file (default: measure now into the bench cache)")
    ap.add_argument("--streams", default="1,4", help="comma-separated stream counts")
    ap.add_argument("--seconds", type=float, default=12.0, help="window per stream count")
    ap.add_argument("--new-tokens", type=int, default=bench_vs_vllm.NEW_TOKENS,
                    help="tokens generated per request (EOS ignored)")
    ap.add_argument("--warmup-seconds", type=float, default=4.0, help="unrecorded first window")
    ap.add_argument("--configs", default="all",
                    help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--note", default="measured on a shared machine (2 cores, other agents "
                    "running): rerun on a quiet one", help="a line in bold at the top")
    ap.add_argument("--out", default="plan", help="results file name (loadtest/results/)")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    bench_vs_vllm.NEW_TOKENS = args.new_tokens  # what the harness's gRPC client asks for
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    t_start = time.perf_counter()
    model = bundled_checkpoint()
    costs = Path(args.costs) if args.costs else CACHE / "plan-costs.json"
    if not args.costs:
        subprocess.run([sys.executable, "-m", "shardserve_server.cli", "plan", "--model",
                        str(model), "--measure", "--costs", str(costs), "--devices",
                        str(max(CONFIGS[n][2] * CONFIGS[n][3] for n in names))],
                       check=True, stdout=subprocess.DEVNULL)
    cost_text = costs.read_text()
    onnx = onnx_export(model) if any(CONFIGS[n][0] == "onnx" for n in names) else model
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest

    prompts = make_prompts(load_tokenizer(model, read_manifest(model)), 2000)
    rows = []
    logs: dict[str, list[str]] = {}
    for run, name in enumerate(names):
        cfg = CONFIGS[name]
        t0 = time.perf_counter()
        proc, target = serve(model, onnx, cfg, run)
        print(f"{name}: up in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            got = asyncio.run(measure(target, prompts, streams, args.seconds,
                                      args.warmup_seconds, args.new_tokens))
        finally:
            proc.stop()
        log = CACHE / "logs" / f"validate-plan-{run}.log"
        logs[name] = server_log.summary(log.read_text(errors="replace")) if log.is_file() else []
        for s, st, load in got:
            # the planner is told the prompt length the server counted
            pred = predicted(costs, cfg, s, 100, args.new_tokens)
            rows.append((name, s, pred, st, load))
            print(f"  {s} streams: tok/s {st.tok_s:.1f} (predicted {pred['tok_s']:.1f}), "
                  f"TTFT {st.ttft_p50 * 1e3:.0f} ms ({pred['ttft_ms']:.0f}), ITL "
                  f"{st.itl_p50 * 1e3:.1f} ms ({pred['itl_ms']:.1f}), load {load:.1f}",
                  flush=True)
    command = " ".join([".venv/bin/python loadtest/validate_plan.py",
                        *(shlex.quote(a) for a in sys.argv[1:])])
    lines = header("shardserve plan: predicted vs measured", command)
    lines += [f"**{args.note}**", "", f"CPU flags: {cpu_flags()}; total "
              f"{time.perf_counter() - t_start:.0f} s", "",
              "Model: SmolLM2-135M-Instruct (bundled, fp32 checkpoint; bf16 cast at load), "
              f"~100-token prompts, {args.new_tokens} new tokens, greedy, EOS ignored, closed-loop "
              f"streams, {args.seconds:g} s windows (first {SKIP:.0%} not counted). Prediction: "
              "`shardserve plan` (server/shardserve_server/plan/predict.py) on the costs "
              "below; ratio = predicted / measured; target: every ratio in "
              f"[{1 - TOLERANCE:.2f}, {1 + TOLERANCE:.2f}].", "",
              "| config | streams | tok/s pred | tok/s meas | ratio | TTFT p50 pred ms | "
              "TTFT meas ms | ratio | ITL pred ms | ITL p50 meas ms | ratio | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    inside = total = 0
    for name, s, pred, st, load in rows:
        rs = [pred["tok_s"] / st.tok_s if st.tok_s else float("nan"),
              pred["ttft_ms"] / (st.ttft_p50 * 1e3) if st.ttft_p50 else float("nan")]
        total += len(rs)
        inside += sum(1 for r in rs if abs(r - 1) <= TOLERANCE)
        lines.append(f"| {name} | {s} | {pred['tok_s']:.1f} | {st.tok_s:.1f} | {rs[0]:.2f} | "
                     f"{pred['ttft_ms']:.0f} | {st.ttft_p50 * 1e3:.0f} | {rs[1]:.2f} | "
                     f"{pred['itl_ms']:.1f} | {st.itl_p50 * 1e3:.1f} | "
                     f"{ratio(pred['itl_ms'], st.itl_p50 * 1e3)} | {load:.1f} |")
    errs = [abs(pred["tok_s"] / st.tok_s - 1) for _, _, pred, st, _ in rows if st.tok_s]
    lines += ["", f"tok/s and TTFT predictions within {TOLERANCE:.0%}: {inside} of {total}; "
              f"median |tok/s error| {statistics.median(errs):.0%}" if errs else "", "",
              "## Server logs", "",
              "Each configuration's own request log (server clock; warm-up and every window; "
              "loadtest/server_log.py): queueing until the leader admitted a request, the step "
              "that gave its first token, its decode steps. With several streams the admission "
              "times show which prompts shared a step and what each waited for.", ""]
    for name, summary in logs.items():
        lines += [f"- **{name}**"] + [f"  - {x}" for x in summary]
    lines += ["", "## Costs used", "", "```json", cost_text.strip(), "```"]
    print(write_results(args.out, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
