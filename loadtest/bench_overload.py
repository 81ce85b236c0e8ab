"""How fast a full queue says no: RESOURCE_EXHAUSTED latency at 10x overload (issue #12).

    .venv/bin/python loadtest/bench_overload.py [--model models/smollm2-135m] [--clients 320]
        [--max-queued 32] [--seconds 30]

Starts `shardserve serve` (bf16, --max-queued-requests 32), then `--clients` closed-loop
streaming clients in this process (grpc.aio): each sends a short prompt for 32 greedy tokens;
a refused call (RESOURCE_EXHAUSTED) is timed from send to status and retried after
--backoff-ms (1 s by default, as a client with retry backoff would).
The first 20% of the window is not counted. Prints and writes loadtest/results/overload.md:
rejection latency p50/p99 (target p99 < 50 ms), accepted requests and tokens/s
(loadtest/results/overload-latest.md; overload.md lists every run by hand).

--probe-hz H also starts a probe client in its own process: H calls a second, each timed to
its refusal (an accepted probe is cancelled at its first message). The 320 load clients share
one Python event loop on the server's cores, so their timings include their own loop's
backlog; the probe sees what a client with an idle loop would see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "server")]

from grpc_servers import RunningServer  # noqa: E402
from results_io import cpu_flags, write_results  # noqa: E402

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb  # noqa: E402
from shardserve_client._pb.shardserve.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def drive(target: str, clients: int, seconds: float, backoff_s: float,
                jitter: float) -> dict:
    t_start = time.monotonic()
    t_count, t_end = t_start + 0.2 * seconds, t_start + seconds
    rejected: list[float] = []
    accepted, tokens, other = 0, 0, {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.TextGenerationStub(ch)

        async def one(i: int) -> None:
            nonlocal accepted, tokens
            n = 0
            while time.monotonic() < t_end:
                n += 1
                req = pb.GenerateRequest(
                    prompt=f"Client {i} request {n}: write a short note about the sea.",
                    sampling=pb.SamplingParameters(temperature=0.0),
                    stopping=pb.StoppingCriteria(max_new_tokens=32, ignore_eos=True))
                t0 = time.monotonic()
                got = 0
                try:
                    async for m in stub.GenerateStream(req, timeout=max(1.0, t_end - t0)):
                        got += len(m.tokens)
                    if t0 >= t_count:
                        accepted += 1
                        tokens += got
                except grpc.aio.AioRpcError as e:
                    if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        if t0 >= t_count:
                            rejected.append(time.monotonic() - t0)
                        await asyncio.sleep(backoff_s * random.uniform(1 - jitter, 1 + jitter))
                    elif time.monotonic() < t_end:
                        other[e.code().name] = other.get(e.code().name, 0) + 1

        await asyncio.gather(*(one(i) for i in range(clients)))
    window = t_end - t_count
    return {"rejected": rejected, "accepted": accepted, "tok_s": tokens / window,
            "other": other}


def row(who: str, ms: list[float]) -> str:
    """A results-table row start: who, count, p50, p99, max (ms)."""
    if not ms:
        return f"| {who} | 0 | | | |"
    return (f"| {who} | {len(ms)} | {statistics.median(ms):.1f} | {pct(ms, 0.99):.1f} | "
            f"{max(ms):.1f} |")


def probe(target: str, seconds: float, hz: float) -> None:
    """The probe process: calls at `hz`, prints a JSON list of refusal latencies (s)."""
    t_start = time.monotonic()
    t_count, t_end = t_start + 0.2 * seconds, t_start + seconds
    out: list[float] = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        n = 0
        while time.monotonic() < t_end:
            n += 1
            req = pb.GenerateRequest(prompt=f"probe {n}: hello",
                                     stopping=pb.StoppingCriteria(max_new_tokens=4))
            t0 = time.monotonic()
            call = stub.GenerateStream(req, timeout=10)
            try:
                next(call)
                call.cancel()  # admitted: do not add load
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and t0 >= t_count:
                    out.append(time.monotonic() - t0)
            except StopIteration:
                pass
            time.sleep(max(0.0, t0 + 1 / hz - time.monotonic()))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory")
    ap.add_argument("--clients", type=int, default=320, help="concurrent closed-loop clients")
    ap.add_argument("--max-queued", type=int, default=32, help="server --max-queued-requests")
    ap.add_argument("--seconds", type=float, default=30.0, help="window length")
    ap.add_argument("--backoff-ms", type=float, default=1000.0,
                    help="a refused client waits this long before it retries")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="retry wait drawn uniformly from backoff x [1-J, 1+J] (gRPC retries "
                         "and AWS-style clients jitter; 0 = every client waits exactly backoff)")
    ap.add_argument("--probe-hz", type=float, default=0.0,
                    help="also run a probe client in its own process at this rate (0 = none)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `shardserve serve` argument (repeat; e.g. "
                    "--server-arg=--worker-nice"
                    " --server-arg=5)")
    ap.add_argument("--probe-target", help=argparse.SUPPRESS)  # internal: be the probe
    args = ap.parse_args()
    if args.probe_target:
        probe(args.probe_target, args.seconds, args.probe_hz)
        return
    server = RunningServer(Path(args.model), "--max-queued-requests", str(args.max_queued),
                           "--dtype", "bf16", *args.server_arg)
    prober = None
    if args.probe_hz > 0:
        prober = subprocess.Popen(
            [sys.executable, __file__, "--probe-target", server.target, "--seconds",
             str(args.seconds), "--probe-hz", str(args.probe_hz)], stdout=subprocess.PIPE,
            text=True)
    try:
        r = asyncio.run(drive(server.target, args.clients, args.seconds, args.backoff_ms / 1000,
                              args.jitter))
        probed = [x * 1000 for x in json.loads(prober.communicate()[0])] if prober else []
    finally:
        server.stop()
    rej = [x * 1000 for x in r["rejected"]]
    flags = cpu_flags()
    text = "\n".join([
        "# Overload: time to RESOURCE_EXHAUSTED (issue #12)", "",
        f"Command: `.venv/bin/python loadtest/bench_overload.py --model {args.model} --clients "
        f"{args.clients} --max-queued {args.max_queued} --seconds {args.seconds:g} --backoff-ms "
        f"{args.backoff_ms:g} --jitter {args.jitter:g} --probe-hz {args.probe_hz:g}"
        + "".join(f" --server-arg={a}" for a in args.server_arg) + "`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU flags: {flags}; "
        "server and clients on the same 2 cores.", "",
        "| who | refusals | p50 ms | p99 ms | max ms | accepted requests | accepted tok/s | "
        "other errors |", "|---|---|---|---|---|---|---|---|",
        row("load clients", rej) + f" {r['accepted']} | {r['tok_s']:.1f} | "
        f"{r['other'] or 'none'} |",
        *([row(f"probe ({args.probe_hz:g}/s)", probed) + " | | |"] if prober else []), "",
        "Target (issue #12): rejection p99 < 50 ms at 10x overload. Before the fix (reported in "
        "the issue, same shape of load): p50 164 ms, p99 314 ms.", ""])
    print(write_results("overload-latest", [text]))


if __name__ == "__main__":
    main()
