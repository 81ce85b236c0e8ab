"""Sync and async clients for shardserve.v1.TextGeneration.

    from shardserve_client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Once upon a time", max_new_tokens=32, temperature=0).text)
        for chunk in c.generate_stream("Hello", max_new_tokens=16):
            print(chunk.text, end="")

Several servers: Client(["10.0.0.1:50051", "10.0.0.2:50051"]) or
Client("dns:///shardserve.default.svc.cluster.local:50051") balance round-robin over the ready
ones (gRPC's round_robin policy with client-side health checking; see targets.py).

Keyword parameters are the proto's field names (flattened); an unknown one is a TypeError.
Errors are raised as ShardserveError subclasses carrying the gRPC status code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from ._pb.shardserve.v1 import generate_pb2 as pb
from ._pb.shardserve.v1 import generate_pb2_grpc as pb_grpc
from .targets import channel_args
from .types import (
    GenerationResult,
    ModelInfo,
    StreamChunk,
    chunk_from_pb,
    error_from_rpc,
    info_from_pb,
    result_from_pb,
)

_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "frequency_penalty", "presence_penalty", "seed")
_STOPPING = ("max_new_tokens", "min_new_tokens", "stop_sequences", "stop_token_ids",
             "ignore_eos", "time_limit_s", "include_stop_sequence")
_OPTIONS = ("return_prompt_tokens", "logprobs", "top_logprobs")
_TOP = ("truncate_prompt_tokens", "priority", "request_id", "n")
_SPECIAL = ("logit_bias", "response_format")
"""logit_bias: {token id: bias}; response_format: {"json_schema": schema (dict or JSON
text)} | {"json_object": True} | {"regex": pattern} | {"choice": [strings]}."""


def _fill(msg: Any, params: dict[str, Any]) -> Any:
    unknown = sorted(set(params) - set(_SAMPLING + _STOPPING + _OPTIONS + _TOP + _SPECIAL))
    if unknown:
        raise TypeError(f"unknown generation parameter(s): {', '.join(unknown)}")
    for group, names in (("sampling", _SAMPLING), ("stopping", _STOPPING),
                         ("options", _OPTIONS)):
        sub = getattr(msg, group)
        for n in names:
            v = params.get(n)
            if v is None:
                continue
            if isinstance(v, list | tuple):
                getattr(sub, n).extend(v)
            else:
                setattr(sub, n, v)
    for n in _TOP:
        if params.get(n) is not None:
            setattr(msg, n, params[n])
    if params.get("logit_bias"):
        msg.sampling.logit_bias.update({int(k): float(v) for k, v in params["logit_bias"].items()})
    rf = params.get("response_format")
    if rf:
        if not isinstance(rf, dict) or len(rf) != 1:
            raise TypeError("response_format must be a dict with one of json_schema, "
                            "json_object, regex, choice")
        (kind, value), = rf.items()
        if kind == "choice":
            msg.response_format.choice.choices.extend(value)
        elif kind == "json_schema" and not isinstance(value, str):
            msg.response_format.json_schema = json.dumps(value)
        else:
            setattr(msg.response_format, kind, value)
    return msg


def _messages(messages: Iterable[Any]) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m, pb.ChatMessage):
            out.append(m)
        else:
            out.append(pb.ChatMessage(role=m["role"], content=m["content"]))
    return out


def _health_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    n, length = len(data), b""
    while True:  # varint
        b, n = n & 0x7F, n >> 7
        length += bytes([b | (0x80 if n else 0)])
        if not n:
            break
    return b"\x0a" + length + data


def _health_status(raw: bytes) -> int:
    return raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0


def _credentials(tls: bool | str | Path) -> grpc.ChannelCredentials | None:
    if tls is False or tls is None:
        return None
    roots = None if tls is True else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=roots)


class _Base:
    """target: "host:port", several "ip:port" (a list or comma-separated) or "dns:///name:port";
    several servers or a DNS name are balanced round-robin over the ready ones (targets.py).
    max_attempts: tries of a call refused with UNAVAILABLE before any response (balanced
    targets; 1: no retry)."""

    def __init__(self, target: str | Sequence[str], *, token: str | None = None,
                 tls: bool | str | Path = False, timeout: float | None = None,
                 options: list[tuple[str, Any]] | None = None, max_attempts: int = 3) -> None:
        self.target, self._options = channel_args(target, options, max_attempts)
        self.timeout = timeout
        self._meta = (("authorization", f"Bearer {token}"),) if token else ()
        self._creds = _credentials(tls)

    def _md(self, metadata: Iterable[tuple[str, str]] | None) -> tuple:
        return self._meta + tuple(metadata or ())

    def _to(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client; use as a context manager or call close()."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", **kw: Any) -> None:
        super().__init__(target, **kw)
        target = self.target
        self._channel = (grpc.secure_channel(target, self._creds, self._options) if self._creds
                         else grpc.insecure_channel(target, self._options))
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda x: x,
            response_deserializer=lambda x: x)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Any, req: Any, timeout: float | None, metadata: Any) -> Any:
        try:
            return fn(req, timeout=self._to(timeout), metadata=self._md(metadata))
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def generate(self, prompt: str, *, timeout: float | None = None, metadata: Any = None,
                 **params: Any) -> GenerationResult:
        req = _fill(pb.GenerateRequest(prompt=prompt), params)
        return result_from_pb(self._call(self._stub.Generate, req, timeout, metadata))

    def chat(self, messages: Iterable[Any], *, timeout: float | None = None,
             metadata: Any = None, **params: Any) -> GenerationResult:
        req = _fill(pb.ChatRequest(messages=_messages(messages)), params)
        return result_from_pb(self._call(self._stub.Chat, req, timeout, metadata))

    def _stream(self, fn: Any, req: Any, timeout: float | None, metadata: Any
                ) -> Iterator[StreamChunk]:
        call = fn(req, timeout=self._to(timeout), metadata=self._md(metadata))
        try:
            for m in call:
                yield chunk_from_pb(m)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()  # no-op when complete; stops generation when the caller breaks out

    def generate_stream(self, prompt: str, *, timeout: float | None = None,
                        metadata: Any = None, **params: Any) -> Iterator[StreamChunk]:
        req = _fill(pb.GenerateRequest(prompt=prompt), params)
        return self._stream(self._stub.GenerateStream, req, timeout, metadata)

    def chat_stream(self, messages: Iterable[Any], *, timeout: float | None = None,
                    metadata: Any = None, **params: Any) -> Iterator[StreamChunk]:
        req = _fill(pb.ChatRequest(messages=_messages(messages)), params)
        return self._stream(self._stub.ChatStream, req, timeout, metadata)

    def tokenize(self, text: str, add_special_tokens: bool = False, *,
                 timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._call(self._stub.Tokenize, req, timeout, None).token_ids)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return info_from_pb(self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout,
                                       None))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> bool:
        """True when the service reports SERVING ("" = liveness, READINESS = readiness)."""
        raw = self._call(self._health, _health_request(service), timeout, None)
        return _health_status(raw) == 1


class AsyncClient(_Base):
    """grpc.aio client with the same methods as Client (awaitable / async iterators)."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", **kw: Any) -> None:
        super().__init__(target, **kw)
        target = self.target
        self._channel = (grpc.aio.secure_channel(target, self._creds, self._options)
                         if self._creds else grpc.aio.insecure_channel(target, self._options))
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda x: x,
            response_deserializer=lambda x: x)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn: Any, req: Any, timeout: float | None, metadata: Any) -> Any:
        try:
            return await fn(req, timeout=self._to(timeout), metadata=self._md(metadata))
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    async def generate(self, prompt: str, *, timeout: float | None = None,
                       metadata: Any = None, **params: Any) -> GenerationResult:
        req = _fill(pb.GenerateRequest(prompt=prompt), params)
        return result_from_pb(await self._call(self._stub.Generate, req, timeout, metadata))

    async def chat(self, messages: Iterable[Any], *, timeout: float | None = None,
                   metadata: Any = None, **params: Any) -> GenerationResult:
        req = _fill(pb.ChatRequest(messages=_messages(messages)), params)
        return result_from_pb(await self._call(self._stub.Chat, req, timeout, metadata))

    async def _stream(self, fn: Any, req: Any, timeout: float | None, metadata: Any
                      ) -> AsyncIterator[StreamChunk]:
        call = fn(req, timeout=self._to(timeout), metadata=self._md(metadata))
        try:
            async for m in call:
                yield chunk_from_pb(m)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()

    def generate_stream(self, prompt: str, *, timeout: float | None = None,
                        metadata: Any = None, **params: Any) -> AsyncIterator[StreamChunk]:
        req = _fill(pb.GenerateRequest(prompt=prompt), params)
        return self._stream(self._stub.GenerateStream, req, timeout, metadata)

    def chat_stream(self, messages: Iterable[Any], *, timeout: float | None = None,
                    metadata: Any = None, **params: Any) -> AsyncIterator[StreamChunk]:
        req = _fill(pb.ChatRequest(messages=_messages(messages)), params)
        return self._stream(self._stub.ChatStream, req, timeout, metadata)

    async def tokenize(self, text: str, add_special_tokens: bool = False, *,
                       timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self._call(self._stub.Tokenize, req, timeout, None)).token_ids)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return info_from_pb(await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(),
                                             timeout, None))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> bool:
        raw = await self._call(self._health, _health_request(service), timeout, None)
        return _health_status(raw) == 1
