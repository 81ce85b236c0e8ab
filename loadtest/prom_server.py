"""A real Prometheus on loopback for load tests: temp config, temp storage, stopped on exit.

    with PrometheusServer([metrics_port], rules=RULES, workdir=tmp) as prom:
        prom.wait_for("shardserve_requests_total", timeout=60)
        prom.query("sum(rate(shardserve_generated_tokens_total[1m]))")

Uses the `prometheus` binary on PATH (Debian's package; its service is not used). A first
scrape takes seconds: `wait_for` polls with a bounded timeout. The config and every file this
module writes are written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from results_io import write_atomic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ScrapeConfig:
    """What the temporary Prometheus scrapes and how often."""

    targets: tuple[str, ...]
    """host:port of each /metrics endpoint (loopback)."""
    interval_s: float = 1.0
    """Scrape and rule-evaluation interval."""
    rules: tuple[str, ...] = ()
    """Rule files to load (recording rules then run on the scraped data)."""


def config_yaml(cfg: ScrapeConfig) -> str:
    targets = ", ".join(f"'{t}'" for t in cfg.targets)
    rules = "".join(f"  - '{Path(r).resolve()}'\n" for r in cfg.rules)
    return (f"global:\n  scrape_interval: {cfg.interval_s:g}s\n"
            f"  evaluation_interval: {cfg.interval_s:g}s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n  - job_name: shardserve\n"
            f"    static_configs:\n      - targets: [{targets}]\n")


class PrometheusServer:
    """The prometheus binary on 127.0.0.1:<free port>; a context manager that stops it."""

    def __init__(self, cfg: ScrapeConfig, workdir: Path, binary: str = "prometheus") -> None:
        exe = shutil.which(binary)
        if exe is None:
            raise FileNotFoundError(f"{binary} not found (apt-get install prometheus)")
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.workdir / "prometheus.yml"
        write_atomic(config, config_yaml(cfg))
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def api(self, path: str, **params: str) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: the result vector (empty when nothing matches yet)."""
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}")["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        """Poll until `expr` returns data (bounded); raise TimeoutError with the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                result = self.query(expr)
                if result:
                    return result
            except (OSError, urllib.error.URLError, RuntimeError):
                pass  # not listening yet
            time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise TimeoutError(f"no data for {expr!r} within {timeout:.0f} s; log:\n{tail}")
