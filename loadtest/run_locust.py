"""One recorded locust run: a real server, a real Prometheus scraping it, locust's stepped
shape, then the chart and a results file with the command, CPU flags and headline numbers.

    .venv/bin/python loadtest/run_locust.py --model models/smollm2-135m --dtype bf16 \\
        --step-users 1,2,4,8,16,32,64 --step-seconds 30

Writes into loadtest/results/: NAME_stats.csv, NAME_stats_history.csv, NAME_failures.csv,
NAME_exceptions.csv, NAME.html (locust), NAME.png (loadtest/charts.py) and NAME.md. Everything
listens on loopback; the server, Prometheus and locust stop when the run ends (the shape stops
after its last step; each child also has a hard timeout).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import charts
from locust_shape import DEFAULT_STEPS, parse_steps
from prom_server import PrometheusServer, ScrapeConfig, free_port
from results_io import RESULTS, cpu_flags, header, write_results

from shardserve_client import READINESS, Client
from shardserve_server.monitoring import rules_path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RunConfig:
    """What is served and how the load steps."""

    model: str
    dtype: str
    step_users: str
    step_seconds: float
    mix: str | None
    name: str
    scrape_s: float
    serve_args: tuple[str, ...]


class Server:
    """`shardserve serve` on 127.0.0.1 with a free gRPC and metrics port."""

    def __init__(self, cfg: RunConfig, log_path: Path) -> None:
        self.metrics_port = free_port()
        cmd = [str(BIN / "shardserve"), "serve", "--model", cfg.model, "--port", "0",
               "--metrics-port", str(self.metrics_port), "--dtype", cfg.dtype, *cfg.serve_args]
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        self.target = self._listening(300)
        with Client(self.target) as c:
            deadline = time.monotonic() + 300
            while not self._ready(c):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"server never became ready; see {log_path}")
                time.sleep(0.5)

    @staticmethod
    def _ready(c: Client) -> bool:
        try:
            return c.health(READINESS, timeout=2)
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def _listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"listening on (\S+)", line)
            if m:
                return m.group(1)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def locust_cmd(cfg: RunConfig, target: str, prefix: Path, html: Path) -> list[str]:
    cmd = ["locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", target,
           "--shape", "steps", "--step-users", cfg.step_users,
           "--step-seconds", f"{cfg.step_seconds:g}", "--csv", str(prefix),
           "--csv-full-history", "--html", str(html), "--only-summary"]
    if cfg.mix:
        cmd += ["--mix", cfg.mix]
    return cmd


def publish(src: Path, dst: Path) -> None:
    """Copy src to dst whole: a temp name beside dst, then rename."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def overall_table(stats: list[dict], seconds: float) -> list[str]:
    out = ["| type | name | requests | failures | median ms | p99 ms | avg tokens | req/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in stats:
        if r["Name"] == "Aggregated":
            continue
        out.append(f"| {r['Type']} | {r['Name']} | {r['Request Count']} | {r['Failure Count']} "
                   f"| {r['50%']} | {r['99%']} | {float(r['Average Content Size']):.1f} "
                   f"| {int(r['Request Count']) / seconds:.2f} |")
    return out


def step_table(prom: PrometheusServer, t0: float, users: list[int], step_s: float) -> list[str]:
    """Per step, from Prometheus (the step's last 2/3, so each level has settled)."""
    w = max(4, int(step_s * 2 / 3))

    def one(expr: str, at: float) -> float | None:
        r = prom.api("query", query=expr, time=f"{at:.3f}")["result"]
        return float(r[0]["value"][1]) if r else None

    def q(p: float, m: str) -> str:
        return f"histogram_quantile({p}, sum by (le) (increase({m}_bucket[{w}s])))"

    def fmt(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
        return "-" if x is None or x != x else f"{x * scale:.{digits}f}"

    out = ["| users | tok/s | ok req/s | failed req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
           "| ITL p99 ms | queue max | KV max % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, u in enumerate(users):
        at = t0 + (i + 1) * step_s - 0.5
        tok = one(f"sum(increase(shardserve_replica_generated_tokens_total[{w}s])) / {w}", at)
        ok = one(f'sum(increase(shardserve_requests_total{{outcome="ok"}}[{w}s])) / {w}', at)
        bad = one(f'sum(increase(shardserve_requests_total{{outcome!="ok"}}[{w}s])) / {w}', at)
        row = [str(u), fmt(tok, digits=1), fmt(ok, digits=2), fmt(bad, digits=2),
               fmt(one(q(0.5, "shardserve_time_to_first_token_seconds"), at), 1000),
               fmt(one(q(0.99, "shardserve_time_to_first_token_seconds"), at), 1000),
               fmt(one(q(0.5, "shardserve_inter_token_latency_seconds"), at), 1000, 1),
               fmt(one(q(0.99, "shardserve_inter_token_latency_seconds"), at), 1000, 1),
               fmt(one(f"max(max_over_time(shardserve_queue_depth[{w}s]))", at)),
               fmt(one(f"max(max_over_time(shardserve_replica_kv_cache_usage_ratio[{w}s]))",
                       at), 100)]
        out.append("| " + " | ".join(row) + " |")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m",
                   help="checkpoint directory to serve (default %(default)s)")
    p.add_argument("--dtype", default="bf16", help="serve --dtype (default %(default)s)")
    p.add_argument("--step-users", default=DEFAULT_STEPS,
                   help="users per step, comma-separated (default %(default)s)")
    p.add_argument("--step-seconds", type=float, default=30.0,
                   help="seconds per step (default %(default)s)")
    p.add_argument("--mix", default=None, help="workload weights (default: locust_mix.py's)")
    p.add_argument("--name", default="locust_smollm2",
                   help="file name stem in loadtest/results/ (default %(default)s)")
    p.add_argument("--scrape-interval", type=float, default=2.0,
                   help="Prometheus scrape interval in seconds (default %(default)s)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra argument for shardserve serve (repeatable, e.g. --serve-arg=--tp=2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cfg = RunConfig(a.model, a.dtype, a.step_users, a.step_seconds, a.mix, a.name,
                    a.scrape_interval, tuple(a.serve_arg))
    users = parse_steps(cfg.step_users)
    command = "python loadtest/run_locust.py " + shlex.join(argv if argv is not None
                                                            else sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    png = RESULTS / f"{cfg.name}.png"
    with tempfile.TemporaryDirectory(prefix="shardserve-locust-") as tmp:
        # locust writes its files in place: it writes them in tmp, and they are published
        # into loadtest/results/ whole (copy to a temp name there, then rename)
        prefix, html = Path(tmp) / cfg.name, Path(tmp) / f"{cfg.name}.html"
        server = Server(cfg, Path(tmp) / "server.log")
        try:
            with PrometheusServer(ScrapeConfig((f"127.0.0.1:{server.metrics_port}",),
                                               cfg.scrape_s, (str(rules_path()),)),
                                  Path(tmp) / "prometheus") as prom:
                prom.wait_for("up", timeout=60)
                time.sleep(2 * cfg.scrape_s)
                lcmd = locust_cmd(cfg, server.target, prefix, html)
                t0 = time.time()
                run = subprocess.run([str(BIN / lcmd[0]), *lcmd[1:]], capture_output=True,
                                     text=True, timeout=len(users) * cfg.step_seconds + 180)
                t1 = time.time()
                time.sleep(2 * cfg.scrape_s)  # the last scrape of the run
                print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")
                charts.main(["--prometheus", prom.url, "--start", f"{t0:.3f}", "--end",
                             f"{t1:.3f}", "--out", str(png), "--users-csv",
                             f"{prefix}_stats_history.csv", "--title",
                             f"{Path(cfg.model).name} ({cfg.dtype}) under locust, "
                             f"users {cfg.step_users}, {cfg.step_seconds:g} s each"])
                steps = step_table(prom, t0, users, cfg.step_seconds)
        finally:
            server_rc = server.stop()
        stats = rows(Path(f"{prefix}_stats.csv"))
        failures = rows(Path(f"{prefix}_failures.csv"))
        for f in sorted(Path(tmp).glob(f"{cfg.name}*")):
            if f.is_file():
                publish(f, RESULTS / f.name)
    shown = " ".join(shlex.quote(x) for x in lcmd).replace(str(HERE.parent) + "/", "")
    shown = shown.replace(str(prefix.parent) + "/", "loadtest/results/")
    lines = header(f"Locust load test: {Path(cfg.model).name}, stepped users (issue #16)",
                   command)
    lines += [f"CPU flags: {cpu_flags()}  ", f"Locust: `{shown}`  ",
              f"Server: `shardserve serve --model {cfg.model} --dtype {cfg.dtype} "
              f"{' '.join(cfg.serve_args)}` (exit code {server_rc}); Prometheus "
              f"{cfg.scrape_s:g} s scrapes with server/shardserve_server/monitoring/rules.yml; "
              f"locust exit code {run.returncode}; run {t1 - t0:.0f} s.", "",
              "## Per step (Prometheus, last 2/3 of each step; quantiles interpolated within "
              "histogram buckets)", "", *steps, "",
              "## Whole run (locust; TTFT and ITL rows are the client's view; ITL req/s is "
              "tokens/s)", "", *overall_table(stats, t1 - t0), ""]
    if failures:
        lines += ["## Failures", "", "| method | name | error | occurrences |", "|---|---|---|---|"]
        lines += [f"| {r['Method']} | {r['Name']} | {r['Error'][:120]} | {r['Occurrences']} |"
                  for r in failures]
        lines.append("")
    lines += [f"Files: `{cfg.name}_stats.csv`, `{cfg.name}_stats_history.csv`, "
              f"`{cfg.name}_failures.csv`, `{cfg.name}_exceptions.csv`, `{cfg.name}.html`, "
              f"`{cfg.name}.png` (tok/s with the user count, TTFT p50/p99, queue, KV usage)."]
    print(write_results(cfg.name, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
