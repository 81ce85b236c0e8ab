"""Malformed request bytes answer INVALID_ARGUMENT with one line, never UNKNOWN and a traceback.

grpcio decodes a request with the method's deserializer before any servicer code runs; when
that raises (bytes that are not a valid protobuf of the method's type), grpc answers UNKNOWN
("Unexpected DecodeError") and logs a full traceback for every such call, which makes the log
easy to flood. This interceptor wraps every method's deserializer so that a decode failure
becomes a `Malformed` value, and the method's behaviour answers it with INVALID_ARGUMENT
before doing anything else. The log gets one line per `LOG_EVERY_S` seconds at most, with the
count of calls since the last line.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("shardserve.requests")
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Malformed:
    """What a wrapped deserializer returns for bytes it cannot decode."""

    error: str


class RateLimitedLog:
    """One warning line per `every_s` seconds, counting the calls it did not log."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self._suppressed = 0

    def due(self) -> int | None:
        """None while the last line is younger than `every_s` (the call is counted); else the
        number of calls not logged since that line (and this call may log)."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return None
        skipped, self._last, self._suppressed = self._suppressed, now, 0
        return skipped

    def __call__(self, message: str) -> bool:
        skipped = self.due()
        if skipped is None:
            return False
        more = f" (+{skipped} more since the last line)" if skipped else ""
        log.warning("%s%s", message, more)
        return True


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any decode failure is the caller's bytes
            return Malformed(f"{type(e).__name__}: {e}".splitlines()[0][:200])

    return decode


async def _result(value: Any) -> Any:
    """A behaviour's answer, whether it was written as a coroutine or a plain function."""
    return await value if inspect.isawaitable(value) else value


async def _aiter(items: Any) -> Any:
    """A behaviour's stream, whether it was written as an async or a plain generator, or as a
    coroutine that writes its messages with context.write (grpc_health's Health/Watch, which
    gRPC's client-side health checking calls)."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    elif inspect.isawaitable(items):
        rest = await items
        for item in rest or ():
            yield item
    else:
        for item in items:
            yield item


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Server interceptor: decode failures of any method -> INVALID_ARGUMENT (see module)."""

    def __init__(self, on_malformed: Callable[[str], None] | None = None) -> None:
        self._log = RateLimitedLog()
        self._on_malformed = on_malformed

    async def _reject(self, method: str, bad: Malformed, context: Any) -> None:
        name = method.rsplit("/", 1)[-1]
        self._log(f"malformed request to {method}: {bad.error}")
        if self._on_malformed is not None:
            self._on_malformed(name)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed request: not a valid protobuf message for {name}")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, reject = details.method, self._reject
        if handler.request_streaming:
            behaviour = handler.stream_stream or handler.stream_unary

            async def checked(it, context):
                async for request in it:
                    if isinstance(request, Malformed):
                        await reject(method, request, context)
                    yield request

            if handler.stream_stream is not None:
                async def guarded(request_iterator, context):
                    async for out in _aiter(behaviour(checked(request_iterator, context),
                                                      context)):
                        yield out
                field = "stream_stream"
            else:
                async def guarded(request_iterator, context):
                    return await _result(behaviour(checked(request_iterator, context), context))
                field = "stream_unary"
        elif handler.unary_stream is not None:
            behaviour = handler.unary_stream

            async def guarded(request, context):
                if isinstance(request, Malformed):
                    await reject(method, request, context)
                async for out in _aiter(behaviour(request, context)):
                    yield out
            field = "unary_stream"
        else:
            behaviour = handler.unary_unary

            async def guarded(request, context):
                if isinstance(request, Malformed):
                    await reject(method, request, context)
                return await _result(behaviour(request, context))
            field = "unary_unary"
        return handler._replace(request_deserializer=_safe(handler.request_deserializer),
                                **{field: guarded})
