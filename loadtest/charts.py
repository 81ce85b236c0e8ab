"""PNG charts of a load test from the Prometheus that scraped it: tok/s, TTFT p50/p99, queue
depth and KV-cache usage over time (one figure, four panels).

    python loadtest/charts.py --prometheus http://127.0.0.1:9090 --start 1765000000 \\
        --end 1765000240 --out loadtest/results/locust_smollm2.png \\
        [--users-csv loadtest/results/locust_smollm2_stats_history.csv]

`--users-csv` (locust's `--csv-full-history` file) adds the user count to the tok/s panel, so
the knee of a stepped run shows. The PNG is written atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChartConfig:
    """Which Prometheus, which time range, which resolution."""

    prometheus: str
    """Base URL of the Prometheus that scraped the run (loopback)."""
    start: float
    """Unix seconds."""
    end: float
    """Unix seconds."""
    step_s: float = 2.0
    """Resolution of the query_range calls."""
    rate_window: str = "15s"
    """Window of rate() and the histogram quantiles (>= 4 scrape intervals)."""


def queries(w: str) -> dict[str, dict[str, str]]:
    """Panel title -> {series label: PromQL}."""
    def q(p: float, m: str) -> str:
        return f"histogram_quantile({p}, sum by (le) (rate({m}_bucket[{w}])))"

    return {
        "Generated tokens / s": {
            "tok/s": f"sum(rate(shardserve_replica_generated_tokens_total[{w}]))"},
        "Time to first token (s)": {
            "p50": q(0.5, "shardserve_time_to_first_token_seconds"),
            "p99": q(0.99, "shardserve_time_to_first_token_seconds")},
        "Requests waiting / running": {
            "queue depth": "sum(shardserve_queue_depth)",
            "running": "sum(shardserve_running_requests)"},
        "KV-cache usage": {
            "used blocks": "max(shardserve_replica_kv_cache_usage_ratio)",
            "reserved": "max(shardserve_kv_cache_reserved_tokens"
                        " / shardserve_kv_cache_capacity_tokens)"},
    }


def query_range(cfg: ChartConfig, expr: str) -> tuple[list[float], list[float]]:
    params = urllib.parse.urlencode({"query": expr, "start": f"{cfg.start:.3f}",
                                     "end": f"{cfg.end:.3f}", "step": f"{cfg.step_s:g}"})
    url = f"{cfg.prometheus.rstrip('/')}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    xs: list[float] = []
    ys: list[float] = []
    for series in body["data"]["result"][:1]:
        for t, v in series["values"]:
            xs.append(float(t) - cfg.start)
            ys.append(float(v))
    return xs, ys


def users_over_time(path: Path, start: float) -> tuple[list[float], list[float]]:
    """(seconds since start, user count) from locust's stats_history CSV (Aggregated rows)."""
    xs, ys = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated" and row.get("User Count"):
                xs.append(float(row["Timestamp"]) - start)
                ys.append(float(row["User Count"]))
    return xs, ys


def fetch(cfg: ChartConfig) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    return {title: {label: query_range(cfg, expr) for label, expr in series.items()}
            for title, series in queries(cfg.rate_window).items()}


def render(data: dict, out: Path, title: str, users: tuple[list, list] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for ax, (panel, series) in zip(axes.flat, data.items(), strict=True):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, linewidth=1.3)
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
        if users is not None and panel.startswith("Generated"):
            ax2 = ax.twinx()
            ax2.step(users[0], users[1], where="post", color="grey", alpha=0.6,
                     linewidth=1.0, label="locust users")
            ax2.set_ylabel("users", fontsize=8)
            ax2.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("seconds since start")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    os.replace(tmp, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True,
                   help="base URL of the Prometheus that scraped the run")
    p.add_argument("--start", type=float, required=True, help="start of the run, unix seconds")
    p.add_argument("--end", type=float, required=True, help="end of the run, unix seconds")
    p.add_argument("--step", type=float, default=2.0,
                   help="query resolution in seconds (default %(default)s)")
    p.add_argument("--rate-window", default="15s",
                   help="rate() window, at least 4 scrape intervals (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--title", default="shardserve under locust load",
                   help="figure title (default %(default)r)")
    p.add_argument("--users-csv", type=Path, default=None,
                   help="locust --csv-full-history file: overlay the user count")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cfg = ChartConfig(a.prometheus, a.start, a.end, a.step, a.rate_window)
    data = fetch(cfg)
    if not any(xs for series in data.values() for xs, _ in series.values()):
        print("charts: Prometheus returned no data for the range", file=sys.stderr)
        return 1
    users = users_over_time(a.users_csv, a.start) if a.users_csv else None
    render(data, a.out, a.title, users)
    print(f"charts: wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
