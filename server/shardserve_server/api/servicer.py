"""shardserve.v1.TextGeneration over the AsyncEngine: validate, submit, stream, account.

The servicer is thin: convert.py validates and converts, the engine queues and batches, and
this module maps outcomes to gRPC status codes, metrics and one structured log line each.
`admit` and `account` are the one admission and accounting path: the OpenAI-compatible HTTP
API (api/http/) calls them too, so both protocols share validation, the queue, the drain
state, the in-flight count and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb
from shardserve_client._pb.shardserve.v1 import generate_pb2_grpc as pb_grpc

from .. import __version__
from ..engine.async_engine import (
    MAX_N,
    EngineError,
    GroupFailed,
    QueueFull,
    RequestRefused,
    RequestStream,
)
from ..engine.grammar import GrammarBackend
from ..engine.stopping import FinishReason
from .convert import (
    FINISH_TO_PB,
    InvalidArgument,
    Prepared,
    RequestLimits,
    prepare,
    stop_fields,
    timing_msg,
    token_msgs,
    top_msgs,
)
from .decode_guard import RateLimitedLog
from .metrics import Metrics

log = logging.getLogger("shardserve.requests")

DEADLINE_SLACK_S = 0.2
"""A call the client ends this close to its deadline (or after) counts as outcome "deadline",
not "cancelled". The client's deadline fires first and cancels the call: the server's copy
(arrival + the grpc-timeout header) runs later by the call's transit time, so at the
cancellation it still has a little time left (seen: a 1.5 s deadline counted as cancelled)."""


def past_deadline(remaining: float | None) -> bool:
    """Whether a call ended with `remaining` seconds (context.time_remaining(); None: no
    deadline) ended at its deadline, within DEADLINE_SLACK_S."""
    return remaining is not None and remaining <= DEADLINE_SLACK_S


class Draining(RuntimeError):
    pass


class LazyGrammar:
    """The front end's grammar compiler (response_format validation at the edge), built on
    the first constrained request (building it reads the whole vocabulary: ~0.3 s)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._backend: GrammarBackend | None = None

    def check(self, c: Any) -> None:
        if self._backend is None:
            inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)
            eos = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ())
            self._backend = GrammarBackend(inner.to_str(), self.vocab_size, eos)
        self._backend.check(c)


def results_of(result: Any) -> list[Any]:
    """A result, or the list of an n > 1 request's results, as a list ([] for None)."""
    if result is None:
        return []
    return list(result) if isinstance(result, list) else [result]


def first_error(result: Any) -> str | None:
    """The error of the first sample that failed in the engine (FinishReason.ERROR), or None.
    Unary answers of both protocols fail as a whole when one sample failed."""
    for r in results_of(result):
        if r.finish_reason is FinishReason.ERROR:
            return r.error or "the request failed in the engine"
    return None


@dataclass
class Ending:
    """How an admitted gRPC request ended, filled in while it runs; `_finish` accounts it."""

    outcome: str = "error"
    """ok, cancelled, deadline, invalid or error (the metrics label)."""
    result: Any = None
    """Its GenerationResult, or the list of an n > 1 request's; None if it never finished."""
    failure: str | None = None
    """Set when the engine failed or refused it after admission (EngineError)."""
    accounted: bool = False


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, engine: Any, tokenizer: Any, manifest: Any, limits: RequestLimits,
                 metrics: Metrics, info: dict[str, Any]) -> None:
        self.engine, self.tokenizer, self.manifest = engine, tokenizer, manifest
        self.limits, self.metrics, self.info = limits, metrics, info
        self.draining = False
        self.active = 0
        self._overload_log = RateLimitedLog(every_s=1.0)
        vocab = int(getattr(manifest, "config", {}).get("vocab_size") or tokenizer.vocab_size)
        self.grammar = LazyGrammar(tokenizer, vocab)

    # ---- helpers
    def _prepare(self, msg: Any, prompt: str) -> Prepared:
        rid = msg.request_id or uuid.uuid4().hex[:16]
        ids = self.tokenizer.encode(prompt) if prompt else []
        return prepare(msg, ids, self.limits, rid, self.tokenizer.vocab_size, self.grammar)

    def _chat_prompt(self, msg: pb.ChatRequest) -> str:
        if not msg.messages:
            raise InvalidArgument("messages", "at least one message is required")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument("messages", "the served model has no chat template")
        msgs = [{"role": m.role, "content": m.content} for m in msg.messages]
        for i, m in enumerate(msgs):
            if not m["role"]:
                raise InvalidArgument(f"messages[{i}].role", "must not be empty")
        try:
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        except Exception as e:  # template errors (raise_exception) are the caller's fault
            raise InvalidArgument("messages", f"chat template rejected them: {e}") from e

    async def _abort(self, context, method: str, outcome: str, code, message: str):
        self.reject(method, outcome, message)
        await context.abort(code, message)

    def _log(self, method: str, p: Prepared | None, outcome: str, **kw: Any) -> None:
        rec = {"event": "request", "method": method, "outcome": outcome,
               "request_id": p.request.request_id if p else None,
               "prompt_tokens": len(p.request.prompt_ids) if p else None, **kw}
        log.info(json.dumps(rec, default=str))

    def _submit(self, p: Prepared) -> RequestStream:
        if self.draining:
            raise Draining("server is draining")
        if p.n == 1:
            return self.engine.submit(p.request, p.priority)
        return self.engine.submit(p.request, p.priority, n=p.n)

    def admit(self, msg: Any, prompt: str | None,
              prompt_ids: list[int] | None = None) -> tuple[Prepared, RequestStream]:
        """Validate, tokenize (or template, when `prompt` is None: a ChatRequest) and queue a
        request. Raises InvalidArgument / ValueError (bad input), QueueFull, Draining or
        EngineError; on success the caller owns one unit of `active` until `account`."""
        if self.draining:
            raise Draining("server is draining")
        # Overload answers before any work: a full queue must not wait behind tokenizing
        # (or templating) this request, which a flood of requests would make slow.
        self.engine.check_capacity(min(max(1, msg.n), MAX_N))
        if prompt_ids is not None:  # token ids instead of text (the HTTP API's prompt)
            bad = [t for t in prompt_ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise InvalidArgument("prompt", f"token ids must be in [0, "
                                      f"{self.tokenizer.vocab_size}), got {bad[0]}")
            rid = msg.request_id or uuid.uuid4().hex[:16]
            p = prepare(msg, prompt_ids, self.limits, rid, self.tokenizer.vocab_size,
                        self.grammar)
        else:
            if prompt is None:
                prompt = self._chat_prompt(msg)
            p = self._prepare(msg, prompt)
        stream = self._submit(p)
        self.active += 1
        return p, stream

    def account(self, method: str, p: Prepared, stream: RequestStream, outcome: str,
                result: Any, **log: Any) -> None:
        """Metrics and the log line of an admitted request that ended; releases `active`.
        `result`: its GenerationResult, the list of them (n > 1), or None."""
        rs = results_of(result)
        n = sum(len(r.token_ids) for r in rs) if rs else stream.generated
        finish = rs[0].finish_reason.value if rs else None
        self.metrics.on_request_done(
            method, outcome, finish_reason=finish or "none",
            prompt_tokens=len(p.request.prompt_ids), generated=n, timing=stream.timing,
            elapsed_s=stream.elapsed())
        self._log(method, p, outcome, generated_tokens=n, finish_reason=finish, samples=p.n,
                  **{k: round(v, 4) for k, v in stream.timing.items() if v is not None}, **log)
        self.active -= 1

    def reject(self, method: str, outcome: str, message: str) -> None:
        """Metrics and the log line of a request refused before (or failed after) admission.
        Overload refusals log one line a second at most (with the count since the last): a
        flood must not cost a log write per call, and the metrics count each one."""
        self.metrics.on_request_done(method, outcome)
        if outcome == "overloaded":
            skipped = self._overload_log.due()
            if skipped is None:
                return
            self._log(method, None, outcome, message=message, more_since_last_line=skipped)
            return
        self._log(method, None, outcome, message=message)

    async def _run(self, method: str, msg: Any, prompt: str | None, context, streaming: bool):
        """One RPC, in three parts: admission (`_admit_or_abort`), the answer (`_replies`:
        the stream's messages, or the one unary response) and finishing (`_finish`: metrics
        and the log line, exactly once, however the RPC ends)."""
        p, stream = await self._admit_or_abort(method, msg, prompt, context)
        end = Ending()
        try:
            async for out in self._replies(p, stream, streaming, end):
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            # closed after its last message (unary, or a finished stream): nothing to cancel.
            # Otherwise the client went away or its deadline passed, while we awaited the next
            # event (CancelledError) or sat at a yield (the stream was closed: GeneratorExit)
            if end.result is None:
                end.outcome = "deadline" if past_deadline(context.time_remaining()) \
                    else "cancelled"
                self.engine.cancel(p.request.request_id)
            raise
        except EngineError as e:  # a dead group is retryable; a failed request is not
            end.outcome = "invalid" if isinstance(e, RequestRefused) else "error"
            end.result, end.failure = None, str(e)
            code = (grpc.StatusCode.UNAVAILABLE if isinstance(e, GroupFailed)
                    else grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, RequestRefused)
                    else grpc.StatusCode.INTERNAL)
            self._finish(method, p, stream, end)  # before abort, which raises
            await context.abort(code, str(e))
        finally:
            self._finish(method, p, stream, end)

    async def _admit_or_abort(self, method: str, msg: Any, prompt: str | None, context
                              ) -> tuple[Prepared, RequestStream]:
        """Admission: `admit`, or abort the RPC with the refusal's status code (bad input:
        INVALID_ARGUMENT, a full queue: RESOURCE_EXHAUSTED, draining or no engine:
        UNAVAILABLE) after counting and logging it."""
        try:
            return self.admit(msg, prompt)
        except (InvalidArgument, ValueError) as e:
            await self._abort(context, method, "invalid", grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            await self._abort(context, method, "overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED,
                              str(e))
        except (Draining, EngineError) as e:
            await self._abort(context, method, "error", grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("context.abort returned")  # it always raises

    async def _replies(self, p: Prepared, stream: RequestStream, streaming: bool, end: Ending):
        """Streaming: one GenerateStreamResponse per event; unary: the one GenerateResponse
        (a sample that failed in the engine raises EngineError). Records the result and its
        outcome in `end` as soon as they are known."""
        if streaming:
            async for out in self._stream(p, stream):
                if stream.final is not None:
                    end.result = stream.final
                    end.outcome = self.outcome_of(end.result)
                yield out
            return
        end.result = await stream.results()
        end.outcome = self.outcome_of(end.result)
        error = first_error(end.result)
        if error is not None:
            raise EngineError(error)
        yield self._response(p, stream, end.result)

    def _finish(self, method: str, p: Prepared, stream: RequestStream, end: Ending) -> None:
        """Finishing: account an admitted request once (metrics, its log line, `active`).
        A request the engine failed or refused counts with finish_reason "error"."""
        if end.accounted:
            return
        end.accounted = True
        stream.close()  # a stream never iterated (RPC cancelled early) left its samples
        if end.failure is None:
            self.account(method, p, stream, end.outcome, end.result)
            return
        self.metrics.on_request_done(
            method, end.outcome, finish_reason="error", prompt_tokens=len(p.request.prompt_ids),
            generated=stream.generated, timing=stream.timing, elapsed_s=stream.elapsed())
        self._log(method, p, end.outcome, message=end.failure)
        self.active -= 1

    @staticmethod
    def outcome_of(result: Any) -> str:
        """The metrics outcome of a finished request (a result or the list of an n > 1
        request's): error if any sample failed, else cancelled if any was, else ok."""
        reasons = {r.finish_reason for r in results_of(result)}
        if FinishReason.ERROR in reasons:
            return "error"
        return "cancelled" if FinishReason.CANCELLED in reasons else "ok"

    def _tokens(self, p: Prepared, r: Any) -> list[pb.Token]:
        if not (p.logprobs and r.logprobs is not None):
            return []
        tops = r.top_logprobs or [None] * len(r.token_ids)
        return [pb.Token(id=tid, text=self.tokenizer.decode([tid]), logprob=lp,
                         top_logprobs=top_msgs(self.tokenizer, tops[i]))
                for i, (tid, lp) in enumerate(zip(r.token_ids, r.logprobs, strict=False))]

    def _response(self, p: Prepared, stream: RequestStream, results: list[Any]
                  ) -> pb.GenerateResponse:
        r = results[0]
        out = pb.GenerateResponse(
            request_id=p.request.request_id, text=r.text, token_ids=r.token_ids,
            finish_reason=FINISH_TO_PB[r.finish_reason], prompt_token_count=r.prompt_tokens,
            generated_token_count=len(r.token_ids), timing=timing_msg(stream.timing),
            cached_prompt_token_count=r.cached_tokens, tokens=self._tokens(p, r),
            **stop_fields(r),
        )
        if len(results) > 1:
            out.samples.extend(pb.Sample(
                index=i, text=x.text, token_ids=x.token_ids,
                finish_reason=FINISH_TO_PB[x.finish_reason], generated_token_count=len(
                    x.token_ids), tokens=self._tokens(p, x),
                cached_prompt_token_count=x.cached_tokens, **stop_fields(x))
                for i, x in enumerate(results))
        if p.return_prompt_tokens:
            out.prompt_tokens.extend(token_msgs(self.tokenizer, list(p.request.prompt_ids)))
        return out

    async def _stream(self, p: Prepared, stream: RequestStream):
        async for ev in stream:
            msg = pb.GenerateStreamResponse(request_id=p.request.request_id, text=ev.text,
                                            index=ev.index)
            if ev.token_id is not None:
                tok = pb.Token(id=ev.token_id, text=ev.text)
                if p.logprobs and ev.logprob is not None:
                    tok.logprob = ev.logprob
                    tok.top_logprobs.extend(top_msgs(self.tokenizer, ev.top_logprobs))
                msg.tokens.append(tok)
            if ev.result is not None:
                r = ev.result
                d = pb.StreamDetails(
                    finish_reason=FINISH_TO_PB[r.finish_reason], prompt_token_count=r.prompt_tokens,
                    generated_token_count=len(r.token_ids), timing=timing_msg(stream.timing),
                    error=r.error or "", cached_prompt_token_count=r.cached_tokens,
                    **stop_fields(r))
                if p.return_prompt_tokens:
                    d.prompt_tokens.extend(token_msgs(self.tokenizer, list(p.request.prompt_ids)))
                msg.details.CopyFrom(d)
            yield msg

    # ---- RPCs
    async def _unary(self, agen):
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    async def Generate(self, request, context):
        return await self._unary(self._run("Generate", request, request.prompt, context, False))

    async def GenerateStream(self, request, context):
        # aclosing: if the client goes away, _run is closed now (it cancels and accounts the
        # request), not whenever the abandoned generator is collected
        async with contextlib.aclosing(
                self._run("GenerateStream", request, request.prompt, context, True)) as agen:
            async for out in agen:
                yield out

    async def Chat(self, request, context):
        return await self._unary(self._run("Chat", request, None, context, False))

    async def ChatStream(self, request, context):
        async with contextlib.aclosing(
                self._run("ChatStream", request, None, context, True)) as agen:
            async for out in agen:
                yield out

    async def Tokenize(self, request, context):
        ids = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, tokens=[self.tokenizer.decode([i]) for i in ids])

    async def ModelInfo(self, request, context):
        m = self.manifest
        return pb.ModelInfoResponse(
            family=m.family, config_json=json.dumps(m.config), dtype=self.info["dtype"],
            backend=self.info.get("backend", "torch"), tensor_parallel=self.info["tp"],
            replicas=self.info.get("replicas", 1), max_sequence_length=self.limits.max_seq_len,
            max_new_tokens=self.limits.max_new_tokens,
            max_batch_size=self.info["max_batch_size"],
            max_queued_requests=self.info["max_queued_requests"],
            vocab_size=self.tokenizer.vocab_size,
            eos_token_ids=list(getattr(self.tokenizer, "eos_token_ids", ()) or ()),
            version=__version__, has_chat_template=bool(self.tokenizer.chat_template),
        )

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active == 0
