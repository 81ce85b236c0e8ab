"""Validate protobuf requests and convert them to engine requests, and results back to protobuf.

Every check raises InvalidArgument(field, message) naming the field and its allowed range; the
servicer answers INVALID_ARGUMENT with that text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb

from ..engine.async_engine import MAX_N
from ..engine.grammar import Constraint
from ..engine.sampling import LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, SamplingParams
from ..engine.sequence import GenerationRequest
from ..engine.stopping import FinishReason, StoppingParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_LEN = 256
MAX_TOP_LOGPROBS = 20
MAX_REQUEST_ID = 128

FINISH_TO_PB = {
    FinishReason.MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    """Server-side bounds a request is validated against."""

    max_seq_len: int
    """Prompt + generated tokens."""
    max_new_tokens: int
    """Upper bound for stopping.max_new_tokens."""
    default_max_new_tokens: int = 64
    """Used when stopping.max_new_tokens is unset."""


@dataclass(frozen=True)
class Prepared:
    request: GenerationRequest
    priority: int
    return_prompt_tokens: bool
    logprobs: bool
    n: int = 1
    """Samples of the prompt (the engine fans the request out)."""


def _logit_bias(msg: pb.SamplingParameters, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = msg.logit_bias
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument("sampling.logit_bias",
                              f"at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
    out = []
    for tid, value in sorted(bias.items()):
        if tid >= vocab_size:
            raise InvalidArgument("sampling.logit_bias",
                                  f"token ids must be < vocab size {vocab_size}, got {tid}")
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:  # NaN fails too
            raise InvalidArgument("sampling.logit_bias",
                                  f"values must be in [-100, 100], got {value} for token {tid}")
        out.append((int(tid), float(value)))
    return tuple(out)


def _constraint(msg: Any, grammar: Any) -> Constraint | None:
    """The request's response_format as a Constraint, checked (and compiled) by `grammar`."""
    if not msg.HasField("response_format"):
        return None
    rf = msg.response_format
    which = rf.WhichOneof("format")
    if which is None:
        return None
    if which == "json_object":
        if not rf.json_object:
            return None
        c = Constraint("json_object")
    elif which == "choice":
        c = Constraint("choice", tuple(rf.choice.choices))
    else:
        c = Constraint(which, getattr(rf, which))
    try:
        c.validate()
        if grammar is not None:
            grammar.check(c)
    except ValueError as e:
        raise InvalidArgument(f"response_format.{which}", str(e)) from e
    return c


def _sampling(msg: pb.SamplingParameters, vocab_size: int = 1 << 31) -> SamplingParams:
    bias = _logit_bias(msg, vocab_size)
    try:  # SamplingParams validates itself; its message names the field
        return SamplingParams(
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_k=msg.top_k,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            min_p=msg.min_p,
            repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty")
            else 1.0,
            frequency_penalty=msg.frequency_penalty,
            presence_penalty=msg.presence_penalty,
            seed=msg.seed if msg.HasField("seed") else None,
            logit_bias=bias,
        )
    except ValueError as e:
        raise InvalidArgument("sampling", str(e)) from e


def _stopping(msg: pb.StoppingCriteria, limits: RequestLimits) -> StoppingParams:
    n = msg.max_new_tokens if msg.HasField("max_new_tokens") else limits.default_max_new_tokens
    if not 1 <= n <= limits.max_new_tokens:
        raise InvalidArgument("stopping.max_new_tokens",
                              f"must be in [1, {limits.max_new_tokens}], got {n}")
    if len(msg.stop_sequences) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stopping.stop_sequences",
                              f"at most {MAX_STOP_SEQUENCES}, got {len(msg.stop_sequences)}")
    for s in msg.stop_sequences:
        if not 1 <= len(s) <= MAX_STOP_LEN:
            raise InvalidArgument("stopping.stop_sequences",
                                  f"each must have 1 to {MAX_STOP_LEN} characters")
    limit = msg.time_limit_s if msg.HasField("time_limit_s") else 0.0
    if limit < 0:
        raise InvalidArgument("stopping.time_limit_s", f"must be >= 0, got {limit}")
    try:  # StoppingParams validates itself; its message names the field
        return StoppingParams(
            max_new_tokens=n, min_new_tokens=msg.min_new_tokens, stop=tuple(msg.stop_sequences),
            stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
            include_stop_str_in_output=msg.include_stop_sequence, time_limit_s=limit or None,
        )
    except ValueError as e:
        raise InvalidArgument("stopping", str(e)) from e


def prepare(msg: Any, prompt_ids: list[int], limits: RequestLimits, request_id: str,
            vocab_size: int, grammar: Any = None) -> Prepared:
    """Common checks of GenerateRequest / ChatRequest once the prompt is tokenized.
    `grammar` (a GrammarBackend) compiles response_format here, so that a bad schema or regex
    is INVALID_ARGUMENT at the edge; None checks only its shape."""
    if len(msg.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} characters")
    n = msg.n or 1
    if not 1 <= n <= MAX_N:
        raise InvalidArgument("n", f"must be in [1, {MAX_N}], got {n}")
    sampling = _sampling(msg.sampling, vocab_size)
    stopping = _stopping(msg.stopping, limits)
    for t in stopping.stop_token_ids:
        if t >= vocab_size:
            raise InvalidArgument("stopping.stop_token_ids", f"must be < vocab size {vocab_size}")
    opts = msg.options
    if opts.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument("options.top_logprobs",
                              f"must be in [0, {MAX_TOP_LOGPROBS}], got {opts.top_logprobs}")
    if not prompt_ids:
        raise InvalidArgument("prompt", "must not be empty")
    room = limits.max_seq_len - stopping.max_new_tokens
    if msg.truncate_prompt_tokens:
        keep = min(msg.truncate_prompt_tokens, room)
        prompt_ids = prompt_ids[-keep:] if keep > 0 else []
        if not prompt_ids:
            raise InvalidArgument("stopping.max_new_tokens",
                                  f"leaves no room for the prompt in {limits.max_seq_len} tokens")
    elif len(prompt_ids) > room:
        raise InvalidArgument(
            "prompt", f"{len(prompt_ids)} tokens + max_new_tokens {stopping.max_new_tokens} "
            f"exceeds the server's limit of {limits.max_seq_len} (the model's context or the "
            "KV budget); set truncate_prompt_tokens to truncate")
    logprobs = None
    if opts.logprobs:
        logprobs = opts.top_logprobs
    constraint = _constraint(msg, grammar)
    req = GenerationRequest(tuple(prompt_ids), sampling, stopping, request_id, logprobs,
                            constraint)
    return Prepared(req, msg.priority, opts.return_prompt_tokens, opts.logprobs, n)


def stop_fields(r: Any) -> dict[str, Any]:
    """The matched stop string or token id of a result, as the proto's fields."""
    if isinstance(r.stop_reason, str):
        return {"matched_stop_sequence": r.stop_reason}
    if isinstance(r.stop_reason, int):
        return {"matched_stop_token_id": r.stop_reason}
    return {}


def token_msgs(tokenizer: Any, ids: list[int]) -> list[pb.Token]:
    return [pb.Token(id=i, text=tokenizer.decode([i])) for i in ids]


def timing_msg(t: dict[str, float | None]) -> pb.Timing:
    return pb.Timing(queue_s=t.get("queue_s") or 0.0,
                     time_to_first_token_s=t.get("ttft_s") or 0.0, total_s=t.get("total_s") or 0.0)


def top_msgs(tokenizer: Any, top: list[tuple[int, float]] | None) -> list[pb.TopLogprob]:
    return [pb.TopLogprob(id=i, text=tokenizer.decode([i]), logprob=lp) for i, lp in top or []]
