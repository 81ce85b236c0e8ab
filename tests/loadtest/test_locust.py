"""The locust load test, headless, against a real `shardserve serve` on the tiny model, with a
real Prometheus (the Debian binary, loopback, temp config and storage) scraping the server and
evaluating the shipped rules during the run; then the chart script against that Prometheus.

One run (4 users, gRPC and OpenAI HTTP, 15 s) serves every test here: requests > 0 (both
protocols) and zero failures at this light
load, TTFT and per-token rows in the CSV, data in Prometheus (raw series and recording rules),
a PNG from loadtest/charts.py.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))
sys.path.insert(0, str(REPO / "tests" / "server"))

from grpc_servers import BIN, RunningServer  # noqa: E402
from locust_mix import DEFAULT_MIX, WORKLOADS, parse_mix, prompt_for  # noqa: E402
from prom_server import PrometheusServer, ScrapeConfig  # noqa: E402

from shardserve_server.monitoring import rules_path  # noqa: E402

RUN_S = 15
HAVE_PROMETHEUS = shutil.which("prometheus") is not None
needs_prometheus = pytest.mark.skipif(
    not HAVE_PROMETHEUS, reason="prometheus binary not installed (.ci/setup installs it)")


class LocustRun:
    def __init__(self, server, prom, proc, prefix: Path, t0: float, t1: float) -> None:
        self.server, self.prom, self.proc, self.prefix = server, prom, proc, prefix
        self.start, self.end = t0, t1

    def rows(self, suffix: str) -> list[dict]:
        with open(f"{self.prefix}_{suffix}.csv", newline="") as f:
            return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locust")
    server = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--max-batch-size", "8",
                           "--kv-cache-tokens", "4096", "--http-port", "0")
    prom = None
    try:
        if HAVE_PROMETHEUS:
            prom = PrometheusServer(ScrapeConfig((f"127.0.0.1:{server.metrics_port}",),
                                                 interval_s=1.0, rules=(str(rules_path()),)),
                                    tmp / "prometheus")
            prom.wait_for("up", timeout=60)
        prefix = tmp / "smoke"
        cmd = [str(BIN / "locust"), "-f", str(REPO / "loadtest" / "locustfile.py"),
               "--headless", "--host", server.target, "--http-host", server.http_url,
               "--shape", "fixed", "-u", "4", "-r", "4",
               "--run-time", f"{RUN_S}s", "--csv", str(prefix), "--csv-full-history",
               "--html", str(tmp / "smoke.html"), "--only-summary", "--loglevel", "WARNING"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=RUN_S + 60)
        yield LocustRun(server, prom, proc, prefix, t0, time.time())
    finally:
        if prom is not None:
            prom.stop()
        assert server.stop() == 0


def test_locust_headless_run_has_requests_no_failures_and_ttft(run):
    assert run.proc.returncode == 0, run.proc.stdout[-3000:] + run.proc.stderr[-3000:]
    stats = {(r["Type"], r["Name"]): r for r in run.rows("stats")}
    grpc_rows = [r for (kind, _), r in stats.items() if kind == "grpc"]
    assert sum(int(r["Request Count"]) for r in grpc_rows) > 0
    http_rows = [r for (kind, _), r in stats.items() if kind == "http"]  # the OpenAI API user
    assert sum(int(r["Request Count"]) for r in http_rows) > 0
    assert sum(int(r["Failure Count"]) for r in stats.values()) == 0
    assert run.rows("failures") == []
    ttft = [r for (kind, _), r in stats.items() if kind == "TTFT"]
    assert ttft and all(int(r["Request Count"]) > 0 for r in ttft)
    assert all(float(r["50%"]) > 0 and float(r["99%"]) >= float(r["50%"]) for r in ttft)
    itl = stats[("ITL", "per token")]
    assert int(itl["Request Count"]) > 0 and float(itl["Requests/s"]) > 0  # tokens/s
    # end-to-end rows carry the generated tokens as their response length
    assert all(float(r["Average Content Size"]) >= 1 for r in grpc_rows + http_rows)
    history = run.rows("stats_history")
    assert any(r["Name"] == "Aggregated" and int(r["User Count"]) == 4 for r in history)
    assert (run.prefix.parent / "smoke.html").stat().st_size > 0


@needs_prometheus
def test_real_prometheus_scraped_the_load_and_evaluated_the_rules(run):
    assert run.proc.returncode == 0
    ok = run.prom.wait_for('sum(shardserve_requests_total{outcome="ok"}) > 0', timeout=30)
    assert float(ok[0]["value"][1]) > 0
    tok = run.prom.wait_for("shardserve:generated_tokens:rate1m > 0", timeout=30)
    assert float(tok[0]["value"][1]) > 0
    itl = run.prom.wait_for("sum(shardserve_inter_token_latency_seconds_count) > 0", timeout=30)
    assert float(itl[0]["value"][1]) > 0
    assert run.prom.wait_for("shardserve:time_to_first_token_seconds:p99_1m >= 0", timeout=30)
    assert run.prom.query("ALERTS") == []  # light load on a healthy server fires nothing


@needs_prometheus
def test_charts_from_the_prometheus_that_scraped_the_run(run, tmp_path):
    import charts

    out = tmp_path / "run.png"
    rc = charts.main(["--prometheus", run.prom.url, "--start", f"{run.start:.3f}",
                      "--end", f"{run.end:.3f}", "--step", "1", "--rate-window", "5s",
                      "--out", str(out), "--users-csv", f"{run.prefix}_stats_history.csv"])
    assert rc == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    xs, ys = charts.query_range(charts.ChartConfig(run.prom.url, run.start, run.end, 1.0),
                                "sum(rate(shardserve_replica_generated_tokens_total[5s]))")
    assert max(ys) > 0


def test_mix_parsing_and_prompts():
    assert parse_mix(DEFAULT_MIX) == {"short_chat": 6, "long_prompt": 2, "long_generation": 2}
    assert parse_mix("long_prompt") == {"long_prompt": 1}
    for bad in ("nope=1", "short_chat=-1", "short_chat=0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)
    w = WORKLOADS["long_prompt"]
    assert prompt_for(w, 1) != prompt_for(w, 2) and len(prompt_for(w, 1).split()) > 300
