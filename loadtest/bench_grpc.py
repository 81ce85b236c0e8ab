"""Benchmark: the gRPC front end against the in-process engine (SmolLM2-135M, bf16, TP=1).

    .venv/bin/python loadtest/bench_grpc.py [--model DIR] [--repeats 2] [--ttft-seconds 60]

Two phases, each on the same worker configuration as `shardserve serve --dtype bf16`
(WorkerConfig: TP=1, bf16, 2 threads, max batch 32, paged KV cache of 16384 tokens):

1. in-process: an `AsyncEngine` (the engine behind the server, with its worker process) driven
   from this process's event loop, requests given as token ids;
2. gRPC: a real `shardserve serve` subprocess on 127.0.0.1, driven by `shardserve_client`'s
   AsyncClient over `GenerateStream` (prompts as text, tokenized by the server).

Throughput: N closed-loop streams (N = 1 and 32), each sending its next request when the
previous one ends; every request is a ~100-token prompt with 64 new tokens (greedy,
ignore_eos). tok/s = generated tokens / wall time of the whole run; TTFT = time from sending
a request to receiving its first token. Front-end overhead = 1 - gRPC tok/s / in-process
tok/s. Each repeat runs both front ends, one after the other (medians over the repeats).
Then TTFT in steady state: 16 closed-loop streams for --ttft-seconds (the first 20% not
counted), through gRPC and in-process, p50 and p99 over the requests of all repeats; there
the streams start 0.25 s apart and each request asks for 48-80 new tokens (mean 64), so that
they do not run in lockstep.

Targets (issue): overhead <= 5% at 32 streams; gRPC TTFT p50 <= 150 ms, p99 <= 600 ms at 16
streams. Writes loadtest/results/grpc.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import header, write_results

SENTENCES = [
    "The history of the Roman Empire spans many centuries and includes periods of expansion,",
    "In a small village at the edge of the forest there lived an old clockmaker who",
    "Write a Python function that returns the nth Fibonacci number using memoization,",
    "The main differences between classical and quantum computers are that qubits",
    "Once upon a time, a curious young fox decided to explore the great river valley,",
    "Photosynthesis is the process by which green plants convert sunlight into energy,",
    "Here is a recipe for a simple tomato soup that anyone can cook at home tonight:",
    "The stock market fell sharply on Monday after reports suggested that inflation",
    "To install the package, open a terminal and run the following command carefully:",
    "My favourite season is autumn because the leaves turn red and golden and the air",
    "The theory of relativity, proposed by Albert Einstein, changed the way we think",
    "Dear team, I am writing to let you know that the quarterly report is now ready,",
]
NEW_TOKENS = 64
PROMPT_TOKENS = 100
TTFT_NEW_TOKENS = (48, 80)
"""New tokens per request in the steady-state TTFT run: uniform in this range (mean 64), so
that the streams do not stay in lockstep (equal lengths would make all 16 finish, and arrive
again, in the same step forever)."""
TTFT_STAGGER_S = 0.25
"""Stream i of the TTFT run starts i x this late (then runs closed-loop)."""


def make_prompts(tok, n: int = 48) -> list[tuple[str, tuple[int, ...]]]:
    """n different prompts of 90-110 tokens (PROMPT_TOKENS +- 10%, seeded):
    (text, ids as the server makes)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        want = PROMPT_TOKENS + rng.randint(-PROMPT_TOKENS // 10, PROMPT_TOKENS // 10)
        parts, j = [], i
        while len(tok.encode(" ".join(parts), add_special_tokens=False)) < want:
            parts.append(SENTENCES[j % len(SENTENCES)])
            j += 5
        ids = tok.encode(" ".join(parts), add_special_tokens=False)[:want]
        text = tok.decode(ids)
        out.append((text, tuple(tok.encode(text, add_special_tokens=True))))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


class Run:
    """Tokens and first-token latencies of one closed-loop run."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ttft: list[tuple[float, float]] = []  # (send time, seconds to first token)
        # gRPC only: (send time, client TTFT - the server's own TTFT): transport and client
        self.extra: list[tuple[float, float]] = []
        self.t0 = time.perf_counter()
        self.t1 = self.t0

    def summary(self, skip_frac: float = 0.0) -> dict:
        wall = self.t1 - self.t0
        cut = self.t0 + skip_frac * wall
        ttft = [t for s, t in self.ttft if s >= cut]
        extra = [t for s, t in self.extra if s >= cut]
        return {"tok_s": self.tokens / wall, "wall_s": wall, "n": len(ttft), "ttft": ttft,
                "extra": extra,
                "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99)}


async def closed_loop(one, prompts, streams: int, per_stream: int | None,
                      seconds: float | None, jitter: bool = False) -> Run:
    """`streams` workers; each sends requests one after another (per_stream of them, or
    until `seconds` have passed). one(prompt, new_tokens) -> (ttft_s, tokens). With jitter,
    stream i starts i x TTFT_STAGGER_S late and asks for TTFT_NEW_TOKENS (seeded)."""
    run = Run()
    deadline = None if seconds is None else run.t0 + seconds
    rng = random.Random(1)

    async def worker(w: int) -> None:
        k = 0
        if jitter:
            await asyncio.sleep(w * TTFT_STAGGER_S)
        while (per_stream is None or k < per_stream) and (
                deadline is None or time.perf_counter() < deadline):
            sent = time.perf_counter()
            new = rng.randint(*TTFT_NEW_TOKENS) if jitter else NEW_TOKENS
            ttft, n, server_ttft = await one(prompts[(w * 7 + k) % len(prompts)], new)
            run.ttft.append((sent, ttft))
            if server_ttft is not None:
                run.extra.append((sent, ttft - server_ttft))
            run.tokens += n
            k += 1

    await asyncio.gather(*(worker(w) for w in range(streams)))
    run.t1 = time.perf_counter()
    return run


# ---------------------------------------------------------------- the two front ends


async def inprocess_phase(model: Path, prompts, args) -> dict:
    from shardserve_server.engine.async_engine import AsyncEngine, EngineLimits
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    engine = AsyncEngine(worker_config(model), EngineLimits())
    await engine.start()
    greedy = SamplingParams(temperature=0.0)

    async def one(prompt, new: int) -> tuple[float, int, None]:
        t0 = time.perf_counter()
        first, n = None, 0
        stop = StoppingParams(max_new_tokens=new, ignore_eos=True)
        async for ev in engine.submit(GenerationRequest(prompt[1], greedy, stop)):
            if ev.token_id is not None:
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
        return first or 0.0, n, None

    try:
        return await measure(one, prompts, args)
    finally:
        await engine.shutdown()


def worker_config(model: Path):
    from shardserve_server.workers.worker import WorkerConfig

    # exactly what `shardserve serve --model M --dtype bf16` builds on 2 cores
    return WorkerConfig(str(model), tp=1, dtype="bfloat16", threads=max(1, os.cpu_count() or 2),
                        kv_cache_tokens=16384, block_size=16, max_batch_size=32,
                        max_prefill_tokens=512)


class Server:
    """`shardserve serve` on 127.0.0.1 (port chosen by the OS), stopped with SIGTERM."""

    def __init__(self, model: Path) -> None:
        exe = Path(sys.executable).with_name("shardserve")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--model", str(model), "--dtype", "bf16", "--port", "0",
             "--metrics-port", "-1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True)
        self.target = None
        for line in self.proc.stdout:
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.target = m.group(1)
                break
        if self.target is None:
            raise SystemExit(f"server did not start (exit {self.proc.wait()})")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def grpc_phase(model: Path, prompts, args) -> dict:
    from shardserve_client import AsyncClient

    server = Server(model)
    try:
        async with AsyncClient(server.target) as client:
            for _ in range(600):  # readiness: the worker group is up
                try:
                    if await client.health("shardserve.v1.TextGeneration", timeout=2):
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                await asyncio.sleep(0.2)

            async def one(prompt, new: int) -> tuple[float, int, float | None]:
                t0 = time.perf_counter()
                first, n, server = None, 0, None
                async for chunk in client.generate_stream(
                        prompt[0], max_new_tokens=new, temperature=0.0,
                        ignore_eos=True, timeout=600):
                    if chunk.token_ids:
                        n += len(chunk.token_ids)
                        if first is None:
                            first = time.perf_counter() - t0
                    if chunk.timing is not None:  # the final message: the server's timings
                        server = chunk.timing.time_to_first_token_s
                return first or 0.0, n, server

            return await measure(one, prompts, args)
    finally:
        server.stop()


async def measure(one, prompts, args) -> dict:
    """Warm-up, then the throughput runs (1 and 32 streams) and the 16-stream TTFT run."""
    await closed_loop(one, prompts, 8, 1, None)  # warm-up: prefill and decode shapes
    out: dict = {}
    for streams, per in ((1, 4), (32, 3)):
        out[streams] = (await closed_loop(one, prompts, streams, per, None)).summary()
    out["ttft16"] = (await closed_loop(one, prompts, 16, None, args.ttft_seconds,
                                       jitter=True)).summary(0.2)
    return out


# ---------------------------------------------------------------- main


def pooled(summaries: list[dict]) -> dict:
    """The TTFT runs of all repeats as one sample (p99 of the pooled first-token times)."""
    ttft = [t for x in summaries for t in x["ttft"]]
    extra = [t for x in summaries for t in x["extra"]]
    return {"n": len(ttft), "tok_s": statistics.median(x["tok_s"] for x in summaries),
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "extra_p50": pct(extra, 0.5), "extra_p99": pct(extra, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="shardserve checkpoint (default: the bundled model, "
                                    "imported once into the benchmark cache)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ttft-seconds", type=float, default=60.0)
    args = ap.parse_args()
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest

    model = Path(args.model) if args.model else bundled_checkpoint()
    tok = load_tokenizer(model, read_manifest(model))
    prompts = make_prompts(tok)
    print(f"prompts: {len(prompts)} of {len(prompts[0][1])} tokens; {NEW_TOKENS} new tokens")
    runs: dict[str, list[dict]] = {"in-process": [], "gRPC": []}
    for r in range(args.repeats):  # interleaved, so that drifts in machine speed hit both
        for name, phase in (("in-process", inprocess_phase), ("gRPC", grpc_phase)):
            t0 = time.perf_counter()
            runs[name].append(asyncio.run(phase(model, prompts, args)))
            got = runs[name][-1]
            print(f"repeat {r + 1} {name}: done in {time.perf_counter() - t0:.0f} s; 1 stream "
                  f"{got[1]['tok_s']:.1f} tok/s, 32 streams {got[32]['tok_s']:.1f} tok/s, "
                  f"TTFT p50/p99 at 16 streams {got['ttft16']['ttft_p50'] * 1e3:.0f}/"
                  f"{got['ttft16']['ttft_p99'] * 1e3:.0f} ms", flush=True)
    res = {name: {1: [x[1] for x in rs], 32: [x[32] for x in rs],
                  "ttft16": pooled([x["ttft16"] for x in rs])} for name, rs in runs.items()}
    lines = header("gRPC front end vs in-process engine (SmolLM2-135M bf16, TP=1)",
                   ".venv/bin/python loadtest/bench_grpc.py "
                   f"--repeats {args.repeats} --ttft-seconds {args.ttft_seconds:g}")
    lines += [f"Closed-loop streams; ~{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens "
              "(greedy, EOS ignored). Medians over the repeats.", "",
              "| streams | in-process tok/s | gRPC tok/s | front-end overhead | "
              "TTFT p50 in-proc / gRPC (ms) | TTFT p99 in-proc / gRPC (ms) |",
              "|---|---|---|---|---|---|"]
    verdict = {}
    for streams in (1, 32):
        a = {k: statistics.median(r[k] for r in res["in-process"][streams])
             for k in ("tok_s", "ttft_p50", "ttft_p99")}
        b = {k: statistics.median(r[k] for r in res["gRPC"][streams])
             for k in ("tok_s", "ttft_p50", "ttft_p99")}
        over = 1 - b["tok_s"] / a["tok_s"]
        verdict[streams] = over
        lines.append(f"| {streams} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {over:+.1%} | "
                     f"{a['ttft_p50'] * 1e3:.0f} / {b['ttft_p50'] * 1e3:.0f} | "
                     f"{a['ttft_p99'] * 1e3:.0f} / {b['ttft_p99'] * 1e3:.0f} |")
    a, b = res["in-process"]["ttft16"], res["gRPC"]["ttft16"]
    lines += ["", f"Steady state, 16 closed-loop streams for {args.ttft_seconds:g} s (first 20% "
              f"not counted; streams started {TTFT_STAGGER_S:g} s apart, {TTFT_NEW_TOKENS[0]}-"
              f"{TTFT_NEW_TOKENS[1]} new tokens per request):", "",
              "| front end | requests | tok/s | TTFT p50 ms | TTFT p99 ms |",
              "|---|---|---|---|---|",
              f"| in-process | {a['n']} | {a['tok_s']:.1f} | {a['ttft_p50'] * 1e3:.0f} | "
              f"{a['ttft_p99'] * 1e3:.0f} |",
              f"| gRPC | {b['n']} | {b['tok_s']:.1f} | {b['ttft_p50'] * 1e3:.0f} | "
              f"{b['ttft_p99'] * 1e3:.0f} |", "",
              "Of the gRPC TTFT, the part outside the engine (client-measured TTFT minus the "
              "server's own, from the final message's timing: transport, protobuf, client): "
              f"p50 {b['extra_p50'] * 1e3:.1f} ms, p99 {b['extra_p99'] * 1e3:.1f} ms. The rest "
              "is the engine's: the wait for the step in flight, then the prefill.", ""]
    ok_over = verdict[32] <= 0.05
    lone = statistics.median(r["ttft_p50"] for r in res["in-process"][1])
    ok_p50, ok_p99 = b["ttft_p50"] <= 0.150, b["ttft_p99"] <= 0.600
    lines += ["Targets:", "",
              f"- front-end overhead at 32 streams <= 5%: {verdict[32]:+.1%} "
              f"({'met' if ok_over else '**missed**'})",
              f"- gRPC TTFT p50 <= 150 ms at 16 streams: {b['ttft_p50'] * 1e3:.0f} ms "
              f"({'met' if ok_p50 else '**missed**'})",
              f"- gRPC TTFT p99 <= 600 ms at 16 streams: {b['ttft_p99'] * 1e3:.0f} ms "
              f"({'met' if ok_p99 else '**missed**'})", "",
              "Both front ends run on the same 2 cores as the worker (the client too, for "
              "gRPC), so the overhead includes the client's share of the CPU.",
              f"A lone request (1 stream) already waits {lone * 1e3:.0f} ms for its first token "
              f"in-process: the prefill of ~{PROMPT_TOKENS} tokens is ~21 GFLOP of GEMMs "
              "(0.21 GFLOP per token outside the embedding), and these 2 cores do at best "
              "~150 GFLOP/s in fp32 (1024x1024 matmul; ~100 at the model's shapes; bf16 is "
              "emulated): ~140 ms at the very least, so the 150 ms p50 target is below this "
              "machine's floor. With 16 streams a new request also waits for the step in "
              "flight (decode steps of 16 rows take ~110-150 ms here) and, now and then, for "
              "another request's prefill in the same step (the p99)."]
    print(write_results("grpc", lines))
    return 0


def bundled_checkpoint() -> Path:
    """The bundled SmolLM2 imported once into $SHARDSERVE_BENCH_CACHE (or ~/.cache)."""
    from shardserve_server.cli import bundled_gguf
    from shardserve_sharding.importers import import_model

    root = Path(os.environ.get("SHARDSERVE_BENCH_CACHE",
                               Path.home() / ".cache" / "shardserve" / "bench"))
    dst = root / "smollm2-135m-fp32"
    if not (dst / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        import_model(bundled_gguf(), dst)
    return dst


if __name__ == "__main__":
    sys.exit(main())
