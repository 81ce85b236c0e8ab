"""`shardserve serve`: start the engine and the gRPC server, report, drain on SIGTERM.

Binds 127.0.0.1 unless told otherwise. Health: service "" is liveness (SERVING while the
process runs), service "shardserve.v1.TextGeneration" is readiness (SERVING only while the
worker group is up and stepping; NOT_SERVING while it restarts, hangs or the server drains).
Reflection lists every service. Optional TLS and bearer-token auth (health stays open).
With `http_port`, the OpenAI-compatible HTTP API (api/http/) is served from the same process,
event loop, servicer and engine (one queue, one set of metrics), with the same TLS and token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb
from shardserve_client._pb.shardserve.v1 import generate_pb2_grpc as pb_grpc

from .. import __version__
from ..engine.async_engine import AsyncEngine, EngineLimits
from ..workers.protocol import GroupStats
from ..workers.worker import WorkerConfig
from .convert import RequestLimits
from .decode_guard import DecodeGuard
from .metrics import Metrics
from .servicer import TextGenerationServicer

SERVICE = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
log = logging.getLogger("shardserve.server")


@dataclass(frozen=True)
class ServerConfig:
    """Network-facing settings of `shardserve serve` (engine settings live in WorkerConfig)."""

    host: str = "127.0.0.1"
    """Address to bind; loopback by default."""
    port: int = 50051
    """gRPC port (0 picks a free one, printed at start)."""
    metrics_port: int | None = 9400
    """Prometheus /metrics port (None disables)."""
    tls_cert: str | None = None
    """PEM certificate chain; with tls_key enables TLS."""
    tls_key: str | None = None
    """PEM private key."""
    auth_token_file: str | None = None
    """File holding the bearer token clients must send (authorization: Bearer <token>)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: seconds to let in-flight requests finish before stopping."""
    max_new_tokens: int = 2048
    """Upper bound on a request's max_new_tokens."""
    http_port: int | None = None
    """OpenAI-compatible HTTP API port on the same host (None: off; 0 picks a free one)."""
    served_model_name: str | None = None
    """The model's name in the HTTP API (default: the checkpoint directory's name)."""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without the bearer token (health checks stay open)."""

    def __init__(self, token: str, on_reject: Any = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got_b, self._expected):
            return await continuation(details)
        if self._on_reject is not None:
            self._on_reject(details.method)
        handler = await continuation(details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


def read_token(path: str) -> str:
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path}: empty auth token file")
    return token


class Server:
    """Engine + gRPC server + metrics; start() then wait(); stop() drains."""

    def __init__(self, cfg: ServerConfig, worker: WorkerConfig, limits: EngineLimits,
                 replicas: int = 1) -> None:
        self.cfg, self.worker, self.limits = cfg, worker, limits
        self.replicas = replicas
        self.metrics = Metrics()
        self.engine = AsyncEngine(worker, limits, on_stats=self._on_stats, replicas=replicas,
                                  on_token_gap=self.metrics.on_token_gap)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else \
            health.HealthServicer()
        self.port: int | None = None
        self.http = None
        self.http_port: int | None = None
        self._stopping = asyncio.Event()

    def _on_stats(self, stats: GroupStats, replica: int = 0) -> None:
        self.metrics.on_step_stats(stats, self.worker.tp, replica)

    async def start(self) -> None:
        """Start the worker groups, then the APIs: servicer, gRPC server, metrics, HTTP."""
        from ..workers.model_dir import describe

        t0 = time.perf_counter()
        served = describe(self.worker.model_dir)
        if served.tokenizer is None:
            raise ValueError(f"{self.worker.model_dir}: checkpoint has no tokenizer")
        info = await self.engine.start()
        self.servicer = self._make_servicer(served)
        self._describe_metrics(served)
        unix = self.cfg.host.startswith("unix:")
        self.server = self._grpc_server()
        self.port = self._bind(self.server, unix)
        if self.cfg.metrics_port is not None:
            self.metrics.serve(self.cfg.metrics_port, "127.0.0.1" if unix else self.cfg.host)
        await self.server.start()
        if self.cfg.http_port is not None:
            await self._start_http()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._ready_task = asyncio.create_task(self._readiness_loop())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.info("serving %s on %s:%d (%s, tp=%d x %d replicas, %s) metrics :%s; start %.1f s; "
                 "workers: load "
                 "%.1f s, warm-up %.2f s, leader peak RSS %.0f MB; front end RSS %.0f MB",
                 served.manifest.family, self.cfg.host, self.port,
                 "TLS" if self.cfg.tls_cert else "plaintext", self.worker.tp, self.replicas,
                 self.worker.dtype,
                 self.cfg.metrics_port, time.perf_counter() - t0, info.load_s,
                 info.warmup_s, info.rss_mb, rss)

    def _make_servicer(self, served: Any) -> TextGenerationServicer:
        """The request limits from the model and the flags, and the servicer over the engine."""
        from shardserve_sharding.models import CacheKind, model_spec

        max_seq = served.max_seq_len
        if model_spec(served.family).cache_kind is CacheKind.PAGED_KV:
            # a request longer than one group's KV budget could never run: refused at the edge
            bs = self.worker.block_size
            max_seq = min(max_seq, max(1, self.worker.kv_cache_tokens // bs) * bs)
        limit = min(self.cfg.max_new_tokens, max_seq - 1)
        limits = RequestLimits(max_seq_len=max_seq, max_new_tokens=limit,
                               default_max_new_tokens=min(64, limit))
        return TextGenerationServicer(
            self.engine, served.tokenizer, served.manifest, limits, self.metrics,
            {"dtype": self.worker.dtype, "tp": self.worker.tp, "replicas": self.replicas,
             "backend": served.backend,
             "max_batch_size": self.worker.max_batch_size,
             "max_queued_requests": self.limits.max_queued_requests},
        )

    def _describe_metrics(self, served: Any) -> None:
        self.metrics.describe(
            version=__version__, max_queued_requests=self.limits.max_queued_requests,
            max_queued_tokens=self.limits.max_queued_tokens, block_size=self.worker.block_size,
            model={"model": Path(self.worker.model_dir).name, "family": served.manifest.family,
                   "dtype": self.worker.dtype, "backend": served.backend, "tp": self.worker.tp,
                   "replicas": self.replicas, "max_batch_size": self.worker.max_batch_size})

    def _grpc_server(self) -> grpc.aio.Server:
        """The grpc.aio server with its interceptors (decode guard, auth) and services."""
        interceptors: list[Any] = [DecodeGuard(lambda method: self.metrics.count(
            method, "invalid"))]
        if self.cfg.auth_token_file:
            reject = lambda method: self.metrics.count(  # noqa: E731
                method.rsplit("/", 1)[-1], "unauthenticated")
            interceptors.append(AuthInterceptor(read_token(self.cfg.auth_token_file), reject))
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_TextGenerationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        return server

    def _bind(self, server: grpc.aio.Server, unix: bool) -> int:
        """Bind --host:--port (TLS when given). "unix:PATH" serves gRPC on a Unix socket (a
        sidecar, or a client outside the network namespace); metrics and HTTP then bind
        loopback."""
        addr = self.cfg.host if unix else f"{self.cfg.host}:{self.cfg.port}"
        if self.cfg.tls_cert and self.cfg.tls_key:
            creds = grpc.ssl_server_credentials(
                [(Path(self.cfg.tls_key).read_bytes(), Path(self.cfg.tls_cert).read_bytes())])
            port = server.add_secure_port(addr, creds)
        else:
            port = server.add_insecure_port(addr)
        if not port:
            raise OSError(f"cannot bind {addr}")
        return port

    async def _start_http(self) -> None:
        from .http.app import HttpApi
        from .http.server import HttpConfig, HttpServer

        name = self.cfg.served_model_name or Path(self.worker.model_dir).resolve().name
        token = read_token(self.cfg.auth_token_file) if self.cfg.auth_token_file else None
        api = HttpApi(self.servicer, name, token)
        self.http = HttpServer(api.app(), HttpConfig(
            host=self.cfg.host, port=self.cfg.http_port, tls_cert=self.cfg.tls_cert,
            tls_key=self.cfg.tls_key))
        self.http_port = await self.http.start()
        log.info("OpenAI-compatible HTTP API on %s://%s:%d (model %r)",
                 "https" if self.cfg.tls_cert else "http", self.cfg.host, self.http_port, name)

    async def _readiness_loop(self) -> None:
        status = None
        while True:
            ready = self.engine.ready and not self.servicer.draining
            new = (health_pb2.HealthCheckResponse.SERVING if ready
                   else health_pb2.HealthCheckResponse.NOT_SERVING)
            if new != status:
                await self.health.set(SERVICE, new)
                status = new
            self.metrics.on_engine_stats(self.engine.stats())
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        """Drain: refuse new work, let in-flight finish (up to drain_timeout_s), stop."""
        self.servicer.draining = True
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        idle = await self.servicer.wait_idle(self.cfg.drain_timeout_s)
        log.info("drain %s; stopping", "complete" if idle else "timed out")
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        self._ready_task.cancel()
        await self.engine.shutdown()
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()


async def serve_forever(cfg: ServerConfig, worker: WorkerConfig, limits: EngineLimits,
                        replicas: int = 1) -> int:
    server = Server(cfg, worker, limits, replicas)
    await server.start()
    if server.http_port is not None:
        scheme = "https" if cfg.tls_cert else "http"
        print(f"shardserve: HTTP API on {scheme}://{cfg.host}:{server.http_port}", flush=True)
    where = cfg.host if cfg.host.startswith("unix:") else f"{cfg.host}:{server.port}"
    print(f"shardserve: listening on {where}", flush=True)
    loop = asyncio.get_running_loop()
    stop_task: list[asyncio.Task] = []

    def on_signal() -> None:
        if not stop_task:
            log.info("signal received: draining")
            stop_task.append(asyncio.ensure_future(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await server.wait()
    return 0


def run(cfg: ServerConfig, worker: WorkerConfig, limits: EngineLimits, replicas: int = 1) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(serve_forever(cfg, worker, limits, replicas))
