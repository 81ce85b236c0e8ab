"""The Starlette application of the OpenAI-compatible API: routes, auth, body limits, SSE.

    POST /v1/completions, POST /v1/chat/completions   unary, or SSE with "stream": true
    GET  /v1/models, /v1/models/{name}                the served model
    GET  /health (liveness), /ready (readiness: the gRPC readiness service's rule)

Every request goes through the gRPC servicer's `admit` and `account` (api/servicer.py): the
same validation, queue, drain state, in-flight count and metrics (method label
"/v1/completions" or "/v1/chat/completions"). A client that disconnects (unary or streaming)
or whose `X-Request-Timeout` passes has its request cancelled in the engine: its KV blocks
are freed at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...engine.async_engine import EngineError, QueueFull, RequestRefused, RequestStream
from ...engine.stopping import FinishReason
from ..convert import InvalidArgument, Prepared
from ..servicer import Draining, first_error
from . import translate as tr
from .errors import HttpError, from_validation
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
)

MAX_BODY = 4 << 20
"""Largest accepted request body (413 above); a prompt of the longest context fits easily."""
DRAIN_LIMIT = 64 << 20
"""An oversized body is read (and dropped) up to this much, so the client gets its 413."""
TIMEOUT_HEADER = "x-request-timeout"
"""Seconds the caller will wait; past it the request is cancelled and answers 504."""
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(exclude_none=False), status,
                    media_type="application/json")


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its generator (which cancels the request in the
    engine and accounts it), however the response ends: done, client gone, or error."""

    def __init__(self, run: _Run, **kw: Any) -> None:
        super().__init__(run.sse(), **kw)
        self.run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.run.finish()  # a generator closed before its first step ran no finally


class HttpApi:
    """The OpenAI-compatible routes over a TextGenerationServicer."""

    def __init__(self, servicer: Any, model_name: str, token: str | None = None,
                 max_body: int = MAX_BODY) -> None:
        self.s = servicer
        self.model_name = model_name
        self._expected = f"Bearer {token}".encode() if token else None
        self.max_body = max_body
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.model, methods=["GET"]),
            Route(COMPLETIONS, self.completions, methods=["POST"]),
            Route(CHAT, self.chat, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={
            HTTPException: self._http_exception, Exception: self._internal})

    # ---- errors outside the routes' own handling
    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        path = request.url.path[:200]
        msg = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}.get(
            exc.status_code, str(exc.detail))
        return HttpError(exc.status_code, msg).response()

    async def _internal(self, request: Request, exc: Exception) -> Response:
        return HttpError(500, f"internal error: {type(exc).__name__}").response()

    # ---- probes and models
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """The gRPC readiness rule: every worker group up and stepping, and not draining."""
        if self.s.engine.ready and not self.s.draining:
            return JSONResponse({"status": "ready"})
        why = "draining" if self.s.draining else "worker group restarting or hung"
        return JSONResponse({"status": "not ready", "reason": why}, 503)

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created,
                         max_model_len=self.s.limits.max_seq_len)

    async def models(self, request: Request) -> Response:
        if (err := self._auth(request)) is not None:
            return err.response()
        return _json(ModelList(data=[self._card()]))

    async def model(self, request: Request) -> Response:
        if (err := self._auth(request)) is not None:
            return err.response()
        name = request.path_params["name"]
        if name != self.model_name:
            return self._unknown_model(name).response()
        return _json(self._card())

    def _unknown_model(self, name: str) -> HttpError:
        shown = name if len(name) <= 100 else name[:100] + "..."
        return HttpError(404, f"model {shown!r} does not exist; this server serves "
                         f"{self.model_name!r}", "model", "model_not_found")

    # ---- generation
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETIONS, CompletionRequest, tr.completion)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, CHAT, ChatRequest, tr.chat)

    def _auth(self, request: Request) -> HttpError | None:
        if self._expected is None:
            return None
        got = request.headers.get("authorization", "").encode("utf-8", "replace")
        if hmac.compare_digest(got, self._expected):
            return None
        return HttpError(401, "missing or invalid bearer token (Authorization: Bearer ...)",
                         None, "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        too_big = HttpError(413, f"the request body exceeds {self.max_body} bytes", None,
                            "request_too_large")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > DRAIN_LIMIT:
            raise too_big  # not worth reading; the connection closes after the answer
        buf, seen = bytearray(), 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= self.max_body:
                buf += chunk
            elif seen > DRAIN_LIMIT:
                break
        if seen > self.max_body:
            raise too_big
        return bytes(buf)

    def _deadline(self, request: Request) -> float | None:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise HttpError(400, f"X-Request-Timeout: must be a number of seconds > 0, got "
                            f"{raw[:40]!r}", "X-Request-Timeout")
        return value

    async def _generate(self, request: Request, method: str, schema: type[BaseModel],
                        translate: Callable[[Any], tr.Translated]) -> Response:
        try:
            if (err := self._auth(request)) is not None:
                raise err
            raw = await self._body(request)
            try:
                body = schema.model_validate_json(raw)
            except ValidationError as e:
                raise from_validation(e) from None
            if body.model is not None and body.model != self.model_name:
                raise self._unknown_model(body.model)
            deadline = self._deadline(request)
            try:
                t = translate(body)
            except (ValueError, TypeError) as e:  # a value the protobuf field cannot hold
                raise HttpError(400, f"unusable value: {str(e)[:200]}") from None
            prefix = "cmpl" if method == COMPLETIONS else "chatcmpl"
            t.msg.request_id = f"{prefix}-{request_id()}"
            try:
                p, stream = self.s.admit(t.msg, t.prompt, t.prompt_ids)
            except (InvalidArgument, ValueError) as e:
                raise tr.openai_error(e, t.names) from None
            except QueueFull as e:
                raise HttpError(429, str(e), None, "queue_full") from None
            except (Draining, EngineError) as e:
                raise HttpError(503, str(e), None, "unavailable") from None
        except HttpError as e:
            self.s.reject(method, e.outcome, e.message)
            return e.response()
        except ClientDisconnect:
            self.s.reject(method, "cancelled", "client disconnected while sending")
            return Response(status_code=400)
        run = _Run(self, method, body, p, stream, deadline)
        if body.stream:
            return SSEResponse(run, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.unary(request)


def request_id() -> str:
    return uuid.uuid4().hex[:24]


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Run:
    """One admitted request: its unary answer or its SSE stream, and its accounting."""

    def __init__(self, api: HttpApi, method: str, body: Any, p: Prepared,
                 stream: RequestStream, deadline: float | None) -> None:
        self.api, self.method, self.body, self.p, self.stream = api, method, body, p, stream
        self.deadline = deadline
        self.chat = method == CHAT
        self.rid = p.request.request_id
        self.created = int(time.time())
        self.tok = api.s.tokenizer
        self.prompt_tokens = len(p.request.prompt_ids)
        self.outcome, self.result = "cancelled", None
        self._cached = 0  # prompt tokens the prefix cache served (from the result)
        self._accounted = False

    def finish(self) -> None:
        """Account the request once (metrics, log line, the servicer's in-flight count)."""
        if self._accounted:
            return
        self._accounted = True
        self.stream.close()  # client gone or failed: the samples leave the batch now
        self.api.s.account(self.method, self.p, self.stream, self.outcome, self.result,
                           **self._log_extra())

    def _usage(self, n: int):
        return tr.usage(self.prompt_tokens, n, self._cached)

    # ---- unary
    async def unary(self, request: Request) -> Response:
        outcome, result = "error", None
        result_task = asyncio.ensure_future(self.stream.results())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result_task, gone}, timeout=self.deadline,
                                         return_when=asyncio.FIRST_COMPLETED)
            if result_task in done:
                try:
                    result = result_task.result()
                except RequestRefused as e:
                    return HttpError(400, str(e), None, "invalid_request_error").response()
                except EngineError as e:
                    return HttpError(503, str(e), None, "unavailable").response()
                outcome = self.api.s.outcome_of(result)
                self._cached = result[0].cached_tokens
                error = first_error(result)
                if error is not None:
                    return HttpError(500, error, None, "engine_error").response()
                return _json(self._whole(result))
            self.api.s.engine.cancel(self.rid)
            if gone in done:
                outcome = "cancelled"
                return Response(status_code=499)  # nobody reads it
            outcome = "deadline"
            return HttpError(504, f"the request's deadline ({self.deadline:g} s, "
                             "X-Request-Timeout) passed", None, "deadline_exceeded").response()
        finally:
            result_task.cancel()
            gone.cancel()
            self.outcome, self.result = outcome, result
            self.finish()

    def _log_extra(self) -> dict[str, Any]:
        user = getattr(self.body, "user", None)
        return {"protocol": "http", **({"user": user[:64]} if user else {})}

    def _whole(self, results: list[Any]) -> BaseModel:
        usage = self._usage(sum(len(r.token_ids) for r in results))
        model = self.api.model_name
        choices: list[Any] = []
        for i, r in enumerate(results):
            fr = tr.finish_reason(r)
            want = self.p.logprobs and r.logprobs is not None
            if self.chat:
                lp = tr.chat_logprobs(self.tok, r.token_ids, r.logprobs, r.top_logprobs) \
                    if want else None
                choices.append(ChatChoice(index=i, message=AssistantMessage(content=r.text),
                                          logprobs=lp, finish_reason=fr,
                                          stop_reason=r.stop_reason))
            else:
                lp = tr.completion_logprobs(self.tok, r.token_ids, r.logprobs, r.top_logprobs) \
                    if want else None
                choices.append(CompletionChoice(index=i, text=r.text, logprobs=lp,
                                                finish_reason=fr, stop_reason=r.stop_reason))
        if self.chat:
            return ChatCompletion(id=self.rid, created=self.created, model=model, usage=usage,
                                  choices=choices)
        return Completion(id=self.rid, created=self.created, model=model, usage=usage,
                          choices=choices)

    # ---- streaming
    async def _events(self) -> AsyncIterator[Any]:
        if self.deadline is None:
            async for ev in self.stream:
                yield ev
            return
        end = time.monotonic() + self.deadline
        it = self.stream.__aiter__()
        while True:
            try:
                ev = await asyncio.wait_for(it.__anext__(), max(0.0, end - time.monotonic()))
            except StopAsyncIteration:
                return
            yield ev

    def _chunk(self, text: str, ev: Any, n: int, finish: str | None,
               usage_now: bool) -> BaseModel:
        usage = self._usage(n) if usage_now else None
        index = ev.index if ev is not None else 0
        stop_reason = ev.result.stop_reason if ev is not None and ev.result else None
        model = self.api.model_name
        ids = [ev.token_id] if ev is not None and ev.token_id is not None else []
        want = self.p.logprobs and ids and ev.logprob is not None
        tops = [ev.top_logprobs] if want and ev.top_logprobs is not None else None
        if self.chat:
            lp = tr.chat_logprobs(self.tok, ids, [ev.logprob], tops) if want else None
            return ChatCompletionChunk(
                id=self.rid, created=self.created, model=model, usage=usage,
                choices=[ChatChunkChoice(index=index, delta=Delta(content=text), logprobs=lp,
                                         finish_reason=finish, stop_reason=stop_reason)])
        offset = self._offset.get(index, 0)
        lp = tr.completion_logprobs(self.tok, ids, [ev.logprob], tops, offset) \
            if want else None
        self._offset[index] = offset + len(text)
        return Completion(id=self.rid, created=self.created, model=model, usage=usage,
                          choices=[CompletionChoice(index=index, text=text, logprobs=lp,
                                                    finish_reason=finish,
                                                    stop_reason=stop_reason)])

    def _usage_chunk(self, n: int) -> BaseModel:
        cls = ChatCompletionChunk if self.chat else Completion
        return cls(id=self.rid, created=self.created, model=self.api.model_name, choices=[],
                   usage=self._usage(n))

    async def sse(self) -> AsyncIterator[str]:
        opts = self.body.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        outcome, result, n = "cancelled", None, 0
        self._offset: dict[int, int] = {}
        done: list[Any] = [None] * self.p.n
        try:
            if self.chat:
                for i in range(self.p.n):
                    yield _sse(ChatCompletionChunk(
                        id=self.rid, created=self.created, model=self.api.model_name,
                        choices=[ChatChunkChoice(index=i,
                                                 delta=Delta(role="assistant", content=""))]))
            try:
                async for ev in self._events():
                    if ev.token_id is not None:
                        n += 1
                    finish = None
                    if ev.result is not None:
                        done[ev.index] = ev.result
                        if all(x is not None for x in done):
                            result = done[0] if self.p.n == 1 else list(done)
                            outcome = self.api.s.outcome_of(result)
                        self._cached = ev.result.cached_tokens
                        if ev.result.finish_reason is FinishReason.ERROR:
                            outcome = "error"
                            yield self._error(HttpError(500, ev.result.error or "the request "
                                                        "failed in the engine", None,
                                                        "engine_error"))
                            break
                        finish = tr.finish_reason(ev.result)
                    if ev.token_id is None and not ev.text and finish is None:
                        continue
                    yield _sse(self._chunk(ev.text, ev, n, finish, continuous))
            except asyncio.TimeoutError:
                outcome = "deadline"
                self.api.s.engine.cancel(self.rid)
                yield self._error(HttpError(504, f"the request's deadline ({self.deadline:g} "
                                            "s, X-Request-Timeout) passed", None,
                                            "deadline_exceeded"))
            except RequestRefused as e:
                outcome = "invalid"
                yield self._error(HttpError(400, str(e), None, "invalid_request_error"))
            except EngineError as e:
                outcome = "error"
                yield self._error(HttpError(503, str(e), None, "unavailable"))
            else:
                if include_usage and outcome == "ok":
                    yield _sse(self._usage_chunk(n))
            yield "data: [DONE]\n\n"
        finally:
            self.outcome, self.result = outcome, result
            self.finish()

    @staticmethod
    def _error(e: HttpError) -> str:
        return f"data: {e.body().model_dump_json()}\n\n"
