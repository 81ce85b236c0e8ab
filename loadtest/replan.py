"""Re-predict a validate_plan results file offline: no server, no measurement, seconds.

    .venv/bin/python loadtest/replan.py [loadtest/results/plan_quiet.md] [--json]
        [--server-logs ~/.cache/shardserve/bench/logs]

A results file of loadtest/validate_plan.py stores every measured point (configuration,
streams, tok/s, TTFT p50, ITL p50, and the prediction made then) and the costs file the
prediction ran on. This script parses both, runs today's planner (the same call validate_plan
makes, `validate_plan.predicted`) on those stored costs, and prints per point the stored
("old") and today's ("new") predicted / measured ratios of tok/s, TTFT and ITL, and how many
tok/s and TTFT ratios fall within validate_plan's tolerance: what a change to the cost model
does to the measured points before anyone reruns the (10-minute, quiet-machine) validation.
A file that cannot be parsed is one line on stderr and exit code 2.

--server-logs DIR also digests the servers' request logs of that run (validate_plan's
validate-plan-<run>.log, one per configuration in CONFIGS order): per configuration, the
median prompt step and decode step at 1 stream (server TTFT less queueing; the rest of the
request over its new tokens) and, at more streams, each request's queueing (until the leader
admitted it) and admission-to-first-token time: which requests shared a prompt step and what
they waited for, the evidence behind the in-phase arrival model (plan/closed_loop.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from server_log import digest_log
from validate_plan import CONFIGS, TOLERANCE, predicted

from shardserve_server.plan import costs as plan_costs

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Point:
    config: str
    streams: int
    old: dict[str, float]
    """The prediction stored in the file (tok_s, ttft_ms, itl_ms)."""
    measured: dict[str, float]


def parse(text: str, where: str) -> tuple[list[Point], plan_costs.MachineCosts, int]:
    """(points, the stored costs, new tokens per request) of a validate_plan results file;
    ValueError with one line when it is not one."""
    m = re.search(r"```json\n(.*?)\n```", text, re.S)
    if not m:
        raise ValueError(f"{where}: no costs JSON block")
    try:
        costs = plan_costs.from_dict(json.loads(m.group(1)), where)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: damaged costs JSON (line {e.lineno})") from None
    g = re.search(r"(\d+) new tokens", text)
    new_tokens = int(g.group(1)) if g else 64
    points = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 11 or cells[0] not in CONFIGS:
            continue
        try:
            v = [float(c) for c in cells[1:10]]
        except ValueError:
            raise ValueError(f"{where}: bad table row: {line.strip()}") from None
        points.append(Point(cells[0], int(v[0]),
                            {"tok_s": v[1], "ttft_ms": v[4], "itl_ms": v[7]},
                            {"tok_s": v[2], "ttft_ms": v[5], "itl_ms": v[8]}))
    if not points:
        raise ValueError(f"{where}: no measured rows")
    return points, costs, new_tokens


def print_logs(folder: Path) -> None:
    names = list(CONFIGS)
    print(f"\nserver logs in {folder} (ms; 'alone': requests that ran alone, the 1-stream "
          "window; 'with others': the rest)")
    for run, name in enumerate(names):
        p = folder / f"validate-plan-{run}.log"
        if not p.is_file():
            continue
        for label, w in sorted(digest_log(p.read_text()).items()):
            med = {k: statistics.median(v) * 1e3 for k, v in w.items()}
            print(f"{name:<20}{label:>9}: n={len(w['queue']):>3}  queue p50 {med['queue']:6.1f}"
                  f"  admission->first token p50 {med['first']:6.1f}  decode step p50 "
                  f"{med['decode']:6.1f}")
            if label == "with others":
                print(f"{'':<31}admission->first token, sorted: "
                      f"{[round(x * 1e3) for x in sorted(w['first'])]}")
                print(f"{'':<31}queue, sorted: {[round(x * 1e3) for x in sorted(w['queue'])]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", default=str(RESULTS / "plan_quiet.md"),
                    help="a validate_plan results file (default: results/plan_quiet.md)")
    ap.add_argument("--json", action="store_true", help="one JSON object per point")
    ap.add_argument("--server-logs", help="folder of that run's validate-plan-<run>.log files "
                    "(validate_plan's bench cache logs/): digest them too")
    args = ap.parse_args()
    try:
        points, costs, new_tokens = parse(Path(args.results).read_text(), args.results)
    except (OSError, ValueError) as e:
        print(f"replan: {e}", file=sys.stderr)
        return 2
    keys = ("tok_s", "ttft_ms", "itl_ms")
    rows = []
    for p in points:
        new = predicted(costs, CONFIGS[p.config], p.streams, 100, new_tokens)
        rows.append((p, new))
    if args.json:
        for p, new in rows:
            print(json.dumps({"config": p.config, "streams": p.streams, "measured": p.measured,
                              "old": p.old, "new": new}))
        return 0
    print(f"{args.results}: predicted / measured, stored prediction (old) and today's planner "
          "(new) on the stored costs")
    print(f"{'config':<20}{'streams':>8}  {'tok/s old':>9} {'new':>6}  {'TTFT old':>9} "
          f"{'new':>6}  {'ITL old':>8} {'new':>6}")
    inside = {"old": 0, "new": 0}
    for p, new in rows:
        r = {k: (p.old[k] / p.measured[k], new[k] / p.measured[k]) for k in keys}
        for i, which in enumerate(("old", "new")):
            inside[which] += sum(abs(r[k][i] - 1) <= TOLERANCE for k in keys[:2])
        flag = "".join("*" if abs(r[k][1] - 1) > TOLERANCE else " " for k in keys[:2])
        print(f"{p.config:<20}{p.streams:>8}  {r['tok_s'][0]:>9.2f} {r['tok_s'][1]:>6.2f}  "
              f"{r['ttft_ms'][0]:>9.2f} {r['ttft_ms'][1]:>6.2f}  {r['itl_ms'][0]:>8.2f} "
              f"{r['itl_ms'][1]:>6.2f} {flag}")
    total = 2 * len(rows)
    print(f"tok/s and TTFT within {TOLERANCE:.0%}: old {inside['old']} of {total}, "
          f"new {inside['new']} of {total} (* : outside, new)")
    if args.server_logs:
        print_logs(Path(args.server_logs).expanduser())
    return 0


if __name__ == "__main__":
    sys.exit(main())
