"""Start and stop real `shardserve serve` subprocesses on loopback for integration tests (and
run `shardserve generate` at TP=1 and TP=2 side by side)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from shardserve_client import READINESS, Client

BIN = Path(sys.executable).parent


def generate_tp1_and_tp2(model: Path) -> tuple[dict, dict]:
    """`shardserve generate --json` (8 greedy tokens of a fixed prompt) in-process and through
    a real TP=2 worker group, run concurrently; their JSON answers."""
    cmd = [str(BIN / "shardserve"), "generate", "--model", str(model), "--prompt",
           "the quick brown", "--max-new-tokens", "8", "--threads", "1", "--json"]
    procs = [subprocess.Popen(cmd + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for extra in ([], ["--tp", "2"])]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    return outs[0], outs[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOW_STEPS = ("env", "SHARDSERVE_FAULT_STEP_DELAY_S=0.01")
"""RunningServer prefix: every engine step sleeps 10 ms more (the leader's fault-injection
hook), so a 400-token request stays in flight for 4 s or more however fast the machine; the
tests that need a request still running when they look use it instead of a longer request."""

SLOW_DEADLINE_S = 1.5
"""A deadline (seconds) a 400-token request on a SLOW_STEPS server cannot meet (it takes 4 s or
more), yet long enough for the server to have admitted the request on a loaded machine: a
deadline measured as a fraction of one run (0.1-0.3 s here) expired on a busy machine before
the server saw the call, so it counted no deadline."""


class RunningServer:
    def __init__(self, model_dir: Path, *args: str, token: str | None = None,
                 tls_ca: Path | None = None, timeout: float = 240.0,
                 prefix: tuple[str, ...] = ()) -> None:
        """prefix: words before the command (e.g. `ip netns exec NS env VAR=X`)."""
        self.metrics_port = free_port()
        cmd = [*prefix, str(BIN / "shardserve"), "serve", "--model", str(model_dir), "--port", "0",
               "--metrics-port", str(self.metrics_port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.log: list[str] = []
        self.http_url: str | None = None  # "http://127.0.0.1:PORT" with --http-port
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.target = self._wait_listening(timeout)
        self.token, self.tls_ca = token, tls_ca
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                try:
                    if c.health(READINESS, timeout=2):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server never became ready:\n" + "".join(self.log[-30:]))

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"HTTP API on (\S+)", line)
            if m:  # printed just before "listening on" when --http-port is given
                self.http_url = m.group(1)
            m = re.search(r"listening on (\S+)", line)
            if m:
                return m.group(1)
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))

    def client(self, **kw) -> Client:
        if self.tls_ca is not None:
            kw.setdefault("tls", str(self.tls_ca))
        if self.token is not None:
            kw.setdefault("token", self.token)
        return Client(self.target, **kw)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        total = 0.0
        found = False
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name or (key.startswith(name + "{") and labels in key):
                total += float(value)
                found = True
        if not found:
            raise KeyError(name)
        return total

    def children(self) -> list[int]:
        import psutil

        kids = psutil.Process(self.proc.pid).children(recursive=True)
        return [c.pid for c in kids if "spawn_main" in " ".join(c.cmdline())]  # not the tracker

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return -9
        return self.proc.returncode


def poll(fn, timeout: float = 15.0) -> bool:
    """Call fn every 0.1 s until it is true or `timeout` seconds pass; its last answer. A
    KeyError (RunningServer.metric: a labelled series not exported yet, e.g. the first request
    of an outcome still being accounted) counts as false until the last call, which raises it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():
                return True
        except KeyError:
            pass
        time.sleep(0.1)
    return bool(fn())
