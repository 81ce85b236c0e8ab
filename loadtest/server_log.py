"""Digest of a shardserve server's request log (one JSON line per finished request): what
each request waited for and how long its steps took, from the server's own clock.

Each completed request logs `queue_s` (until the group leader admitted it, i.e. the step in
flight and any earlier prompt steps it had to wait for), `ttft_s` and `total_s`; so
`ttft_s - queue_s` is the step that produced its first token and `(total_s - ttft_s) /
(generated - 1)` its mean decode step. Requests that ran alone (a 1-stream window) and those
that overlapped others are kept apart: with several streams the admission times show which
prompts shared a step (loadtest/replan.py, loadtest/validate_plan.py).
"""

from __future__ import annotations

import datetime
import json
import re
import statistics


def digest_log(text: str) -> dict[str, dict[str, list[float]]]:
    """One server log's completed requests, split into those that ran alone (the 1-stream
    window) and those that overlapped others: each one's queueing (until the leader admitted
    it), admission-to-first-token time and mean decode step (seconds)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"(\S+ \S+) INFO shardserve\.requests (\{.*\})$", line)
        if not m:
            continue
        d = json.loads(m.group(2))
        if d.get("outcome") != "ok" or "queue_s" not in d:
            continue
        end = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        rows.append((end - d["total_s"], end, d))
    out: dict[str, dict[str, list[float]]] = {}
    for start, end, d in rows:
        # another request running in the middle of this one (not just touching its ends)
        shared = any(s < end - 0.1 and e > start + 0.1 for s, e, o in rows if o is not d)
        w = out.setdefault("with others" if shared else "alone",
                           {"queue": [], "first": [], "decode": []})
        w["queue"].append(d["queue_s"])
        w["first"].append(d["ttft_s"] - d["queue_s"])
        w["decode"].append((d["total_s"] - d["ttft_s"]) / max(1, d["generated_tokens"] - 1))
    return out


def summary(text: str) -> list[str]:
    """Markdown lines for one log: per group, n, medians (ms), and for the requests that ran
    with others every admission-to-first-token and queueing time (ms, sorted)."""
    lines = []
    for label, w in sorted(digest_log(text).items()):
        med = {k: statistics.median(v) * 1e3 for k, v in w.items()}
        lines.append(f"{label}: {len(w['queue'])} requests, queue p50 {med['queue']:.1f} ms, "
                     f"admission to first token p50 {med['first']:.1f} ms, decode step p50 "
                     f"{med['decode']:.1f} ms")
        if label == "with others":
            lines.append("admission to first token, ms: "
                         + " ".join(str(round(x * 1e3)) for x in sorted(w["first"])))
            lines.append("queue, ms: " + " ".join(str(round(x * 1e3)) for x in sorted(w["queue"])))
    return lines
