"""Summarise a group leader's step trace: where a loaded server's time went, step by step.

    SHARDSERVE_STEP_TRACE=/tmp/trace shardserve serve ...   (or any benchmark that starts
        one: the variable reaches the workers)
    .venv/bin/python loadtest/step_trace.py /tmp/trace.* [--skip 0.4]

Each group leader appends one line per step to /tmp/trace.<its pid> (workers/leader.py,
STEP_TRACE_ENV; each file is summarised on its own): monotonic end time,
step seconds, prompt-step and decode-step forward seconds, tokens of the step's prompt forward
(prompt chunks and, in a flat step, its decode rows), rows of a decode-only forward, rows of
the prompt forward. Prints, over the steps after the first --skip of the span: the span,
the time between steps (front end, IPC), decode-only steps and steps with prompt tokens (count,
mean ms, their share), and the tokens generated per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Step:
    end: float
    step_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    """Tokens of the step's forward with prompt chunks (0: a decode-only step)."""
    decode_rows: int
    prefill_rows: int


def parse(text: str) -> list[Step]:
    """The trace's steps (malformed lines, e.g. a last one cut short, are skipped)."""
    steps = []
    for line in text.splitlines():
        f = line.split()
        if len(f) != 7:
            continue
        try:
            steps.append(Step(*map(float, f[:4]), *map(int, f[4:])))
        except ValueError:
            continue
    return steps


def summarize(steps: list[Step], skip: float = 0.4) -> str:
    if not steps:
        return "no steps in the trace"
    t0, t1 = steps[0].end, steps[-1].end
    kept = [s for s in steps if s.end >= t0 + skip * (t1 - t0)]
    span = kept[-1].end - kept[0].end + kept[0].step_s
    busy = sum(s.step_s for s in kept)
    dec = [s for s in kept if s.prompt_tokens == 0]
    mix = [s for s in kept if s.prompt_tokens > 0]
    # a flat step's rows are all in its prompt forward; an engine without flat steps runs a
    # prompt forward and a decode forward in one step: both count
    tokens = sum(s.decode_rows + s.prefill_rows for s in kept)
    out = [f"span {span:.2f} s, {len(kept)} steps, between steps {span - busy:.2f} s "
           f"({(span - busy) / span:.0%})"]
    for name, group in (("decode-only", dec), ("with prompt tokens", mix)):
        if group:
            total = sum(s.step_s for s in group)
            extra = (f", {statistics.fmean(s.prompt_tokens for s in group):.0f} tokens"
                     if group is mix else
                     f", {statistics.fmean(s.decode_rows for s in group):.1f} rows")
            out.append(f"{name}: {len(group)} steps, mean {1e3 * total / len(group):.1f} ms"
                       f"{extra}, {total / span:.0%} of the span")
    out.append(f"~{tokens / span:.1f} tokens/s (rows of every forward: a prompt chunk counts "
               "one)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="+", help="files written under SHARDSERVE_STEP_TRACE")
    ap.add_argument("--skip", type=float, default=0.4,
                    help="fraction of the span at its start not counted (warm-up, ramp)")
    a = ap.parse_args()
    for name in a.trace:
        try:
            text = Path(name).read_text()
        except OSError as e:
            print(f"error: cannot read {name}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"{name}:\n{summarize(parse(text), a.skip)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
