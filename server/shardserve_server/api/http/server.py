"""uvicorn inside the front end's running event loop: own socket, optional TLS, clean stop.

The gRPC server owns SIGTERM/SIGINT (drain), so uvicorn's signal capture is turned off;
`stop()` asks uvicorn to finish (it waits up to `grace_s` for open connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from ..decode_guard import LOG_EVERY_S

log = logging.getLogger("shardserve.http")


@dataclass(frozen=True)
class HttpConfig:
    """Where and how the HTTP API listens (`serve --http-port`)."""

    host: str = "127.0.0.1"
    """Bind address; the gRPC server's host."""
    port: int = 8000
    """0 picks a free port (the bound one is printed at start)."""
    tls_cert: str | None = None
    """PEM certificate chain; with tls_key the API is served over HTTPS."""
    tls_key: str | None = None
    """PEM private key."""
    grace_s: float = 5.0
    """On stop: seconds to let open connections finish."""


class _RateLimit(logging.Filter):
    """uvicorn's one warning per malformed HTTP request, at most once per `every_s` seconds
    (as the gRPC side's malformed-protobuf line): a flood of garbage must not flood the log."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every_s, self._last, self._dropped = every_s, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING or "Invalid HTTP request" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._dropped += 1
            return False
        if self._dropped:
            record.msg = f"{record.msg} (+{self._dropped} more since the last line)"
        self._last, self._dropped = now, 0
        return True


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the front end handles signals (drain)
        yield


class HttpServer:
    """Serve an ASGI app on the running loop: `await start()` binds, `await stop()` ends."""

    def __init__(self, app, cfg: HttpConfig) -> None:
        self.cfg = cfg
        self._config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, log_level="warning",
            ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key,
            timeout_graceful_shutdown=int(max(1, cfg.grace_s)), server_header=False,
            timeout_keep_alive=30,
        )
        self._server = _InLoopServer(self._config)
        uv_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _RateLimit) for f in uv_log.filters):
            uv_log.addFilter(_RateLimit())
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind HTTP {self.cfg.host}:{self.cfg.port}: {e}") from e
        sock.set_inheritable(False)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # failed to start: raise its error
                self._task.result()
                raise OSError(f"HTTP server on {self.cfg.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, self.cfg.grace_s + 5)
        except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - stopping anyway
            log.warning("HTTP server stop: %s", e or type(e).__name__)
