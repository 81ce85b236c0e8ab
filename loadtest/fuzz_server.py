"""Drive a real `shardserve serve` with thousands of hostile requests; print the status histogram.

    .venv/bin/python loadtest/fuzz_server.py                    # 5,000 calls, tiny model
    .venv/bin/python loadtest/fuzz_server.py --examples 500 --model models/smollm2-135m

The requests are those of the CI property test (loadtest/hostile_requests.py): every field of
every RPC at and beyond its range, malformed bytes on every method, duplicate ids in flight,
short deadlines. Without --model a random tiny Llama is made in a temporary directory. The run
passes when no call ended INTERNAL or UNKNOWN (or any status outside the documented set), the
worker group kept its processes and its restart counter at 0, and a greedy request returns
the same tokens after the run as before it. Results go to loadtest/results/fuzz.md.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, seed, settings

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "server")]

import hostile_requests as hr  # noqa: E402
from grpc_servers import RunningServer  # noqa: E402


def tiny_model(root: Path) -> Path:
    from conftest import _write_tiny

    return _write_tiny(root / "tiny-llama", "llama", 2, tie=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="calls to make (default 5000)")
    ap.add_argument("--model", help="checkpoint to serve (default: a random tiny Llama)")
    ap.add_argument("--limit", type=int, default=24, help="server's --max-new-tokens-limit")
    ap.add_argument("--seed", type=int, default=12, help="hypothesis seed")
    ap.add_argument("--out", default=str(HERE / "results" / "fuzz.md"), help="results file")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else tiny_model(Path(tmp.name))
    server = RunningServer(model, "--max-new-tokens-limit", str(args.limit),
                           "--max-queued-requests", "64", "--max-batch-size", "8")
    channel = grpc.insecure_channel(server.target, options=[
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20)])
    hist: collections.Counter[tuple[str, str]] = collections.Counter()
    bad: list[str] = []
    with server.client() as c:
        greedy = lambda: c.generate("the quick brown fox", max_new_tokens=12,  # noqa: E731
                                    temperature=0.0, ignore_eos=True).token_ids
        before, pids = greedy(), server.children()
        t0 = time.monotonic()

        @settings(max_examples=args.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(call=hr.calls(args.limit))
        def drive(call):
            for status, detail in hr.run_call(channel, call):
                hist[(call.method, status.name)] += 1
                if status not in hr.ALLOWED:
                    bad.append(f"{status.name}: {detail} <- {call!r}"[:400])

        seed(args.seed)(drive)()
        elapsed = time.monotonic() - t0
        after = greedy()
    restarts = server.metric("shardserve_worker_group_restarts_total")
    same_pids = server.children() == pids
    code = server.stop()
    channel.close()

    totals = collections.Counter()
    for (_, status), n in hist.items():
        totals[status] += n
    ok = not bad and restarts == 0 and same_pids and after == before and code == 0
    lines = [
        "# Hostile-input run through a real server",
        "",
        f"Command: `.venv/bin/python loadtest/fuzz_server.py --examples {args.examples}"
        + (f" --model {args.model}" if args.model else "") + f" --seed {args.seed}`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model: "
        f"{'random tiny Llama' if not args.model else args.model}; {elapsed:.0f} s.",
        "",
        f"Result: **{'PASS' if ok else 'FAIL'}**: {sum(totals.values())} calls "
        f"({args.examples} drawn; duplicate-id draws send two), statuses outside the documented "
        f"set: {len(bad)}; worker group restarts: {restarts:.0f}; same worker pids: {same_pids};"
        f" greedy output unchanged: {after == before}; server exit code {code}.",
        "",
        "| status | calls |", "|---|---|",
        *[f"| {s} | {n} |" for s, n in totals.most_common()],
        "", "By method:", "", "| method | status | calls |", "|---|---|---|",
        *[f"| {m} | {s} | {n} |" for (m, s), n in sorted(hist.items())],
    ]
    if bad:
        lines += ["", "First failures:", "", *[f"- `{b}`" for b in bad[:20]]]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    tmp_out = out.with_suffix(".md.tmp")
    tmp_out.write_text(text)
    tmp_out.replace(out)  # whole or not at all (results_io writes only under results/)
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
