"""Result types and errors of the shardserve client (plain dataclasses, no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc

from ._pb.shardserve.v1 import generate_pb2 as pb


class FinishReason(str, Enum):
    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    ERROR = "error"
    UNSPECIFIED = "unspecified"


_FINISH = {
    pb.FINISH_REASON_MAX_TOKENS: FinishReason.MAX_TOKENS,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    pb.FINISH_REASON_TIME_LIMIT: FinishReason.TIME_LIMIT,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    pb.FINISH_REASON_ERROR: FinishReason.ERROR,
}


def finish_reason(value: int) -> FinishReason:
    return _FINISH.get(value, FinishReason.UNSPECIFIED)


@dataclass(frozen=True)
class Timing:
    queue_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """One of the n samples of a request (GenerationResult.samples)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    generated_token_count: int
    logprobs: list[float] | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it (None for EOS, length, ...)."""
    cached_prompt_token_count: int = 0


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_token_count: int
    generated_token_count: int
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, str, float]]] | None
    prompt_tokens: list[Token]
    timing: Timing
    cached_prompt_token_count: int = 0
    """Of prompt_token_count, the tokens served from the server's prefix cache."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended generation (None for EOS, length, ...)."""
    samples: list[Sample] = field(default_factory=list)
    """With n > 1: every sample by index (sample 0 is also the fields above)."""


@dataclass(frozen=True)
class StreamChunk:
    """One streamed message: new text, its token ids; the last one has finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: FinishReason | None = None
    prompt_token_count: int | None = None
    generated_token_count: int | None = None
    timing: Timing | None = None
    error: str | None = None
    """With FinishReason.ERROR: why the request failed."""
    cached_prompt_token_count: int | None = None
    """Last message: prompt tokens served from the server's prefix cache."""
    index: int = 0
    """The sample this chunk belongs to (n > 1)."""
    stop_reason: str | int | None = None
    """Last message of a sample: the stop string or stop token id that ended it."""


@dataclass(frozen=True)
class ModelInfo:
    family: str
    config: dict[str, Any]
    dtype: str
    backend: str
    tensor_parallel: int
    replicas: int
    max_sequence_length: int
    max_new_tokens: int
    max_batch_size: int
    max_queued_requests: int
    vocab_size: int
    eos_token_ids: list[int]
    version: str
    has_chat_template: bool


def _timing(t: pb.Timing) -> Timing:
    return Timing(t.queue_s, t.time_to_first_token_s, t.total_s)


def _token(t: pb.Token) -> Token:
    return Token(t.id, t.text, t.logprob if t.HasField("logprob") else None,
                 [(x.id, x.text, x.logprob) for x in t.top_logprobs])


def _stop_reason(m: Any) -> str | int | None:
    if m.matched_stop_sequence:
        return m.matched_stop_sequence
    return m.matched_stop_token_id if m.HasField("matched_stop_token_id") else None


def result_from_pb(r: pb.GenerateResponse) -> GenerationResult:
    logprobs = [t.logprob for t in r.tokens] if r.tokens else None
    top = [[(x.id, x.text, x.logprob) for x in t.top_logprobs] for t in r.tokens] \
        if r.tokens and any(t.top_logprobs for t in r.tokens) else None
    return GenerationResult(
        request_id=r.request_id, text=r.text, token_ids=list(r.token_ids),
        finish_reason=finish_reason(r.finish_reason), prompt_token_count=r.prompt_token_count,
        generated_token_count=r.generated_token_count, logprobs=logprobs, top_logprobs=top,
        prompt_tokens=[_token(t) for t in r.prompt_tokens], timing=_timing(r.timing),
        cached_prompt_token_count=r.cached_prompt_token_count, stop_reason=_stop_reason(r),
        samples=[Sample(x.index, x.text, list(x.token_ids), finish_reason(x.finish_reason),
                        x.generated_token_count, [t.logprob for t in x.tokens] or None,
                        _stop_reason(x), x.cached_prompt_token_count) for x in r.samples],
    )


def chunk_from_pb(m: pb.GenerateStreamResponse) -> StreamChunk:
    lps = [t.logprob for t in m.tokens if t.HasField("logprob")] or None
    if m.HasField("details"):
        d = m.details
        return StreamChunk(m.text, [t.id for t in m.tokens], lps, finish_reason(d.finish_reason),
                           d.prompt_token_count, d.generated_token_count, _timing(d.timing),
                           d.error or None, d.cached_prompt_token_count, m.index,
                           _stop_reason(d))
    return StreamChunk(m.text, [t.id for t in m.tokens], lps, index=m.index)


def info_from_pb(i: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        family=i.family, config=json.loads(i.config_json or "{}"), dtype=i.dtype,
        backend=i.backend, tensor_parallel=i.tensor_parallel, replicas=i.replicas,
        max_sequence_length=i.max_sequence_length, max_new_tokens=i.max_new_tokens,
        max_batch_size=i.max_batch_size, max_queued_requests=i.max_queued_requests,
        vocab_size=i.vocab_size, eos_token_ids=list(i.eos_token_ids), version=i.version,
        has_chat_template=i.has_chat_template,
    )


class ShardserveError(Exception):
    """A call failed; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(ShardserveError):
    pass


class Overloaded(ShardserveError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry later."""


class DeadlineExceeded(ShardserveError):
    pass


class Cancelled(ShardserveError):
    pass


class Unauthenticated(ShardserveError):
    pass


class Unavailable(ShardserveError):
    pass


class InternalError(ShardserveError):
    pass


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_from_rpc(e: grpc.RpcError) -> ShardserveError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return _ERRORS.get(code, ShardserveError)(code, details or "")
