"""OpenAI request bodies -> shardserve.v1 messages, and engine results -> OpenAI bodies.

A body becomes the same GenerateRequest / ChatRequest a gRPC client would send, so that
api/convert.py validates both protocols with one set of rules; its messages name the proto
fields (`stopping.max_new_tokens`), which `openai_error` renames to the body's fields
(`max_tokens`). What shardserve does not do is refused here with a 400 naming the field:
best_of > 1, echo, suffix, tools, non-text content parts, several prompts in one request.
`n` (1 to 16), `logit_bias` (token id strings -> [-100, 100]) and structured output
(`response_format` json_object / json_schema, or vLLM's `structured_outputs` json / regex /
choice) map to their shardserve.v1 fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb

from ...engine.async_engine import MAX_N
from ...engine.stopping import FinishReason
from ..convert import InvalidArgument
from .errors import HttpError, invalid
from .schemas import (
    ChatLogprobs,
    ChatRequest,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
    _Sampling,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat defaults to the server's (as gRPC does)."""

FINISH = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop",
          FinishReason.MAX_TOKENS: "length", FinishReason.TIME_LIMIT: "length",
          FinishReason.CANCELLED: "abort", FinishReason.ERROR: "error"}


@dataclass
class Translated:
    """A body as a shardserve.v1 message, and how to name its fields back."""

    msg: Any
    prompt: str | None = None
    """Completions: the prompt text (None for chat, or when prompt_ids is set)."""
    prompt_ids: list[int] | None = None
    names: dict[str, str] = field(default_factory=dict)
    """proto field name -> the body's field name, for error messages."""


def _logit_bias(msg: Any, bias: dict[str, Any]) -> None:
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= 2**32:
            raise invalid("logit_bias", f"keys must be token ids (decimal strings), got "
                          f"{key[:40]!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("logit_bias", f"values must be numbers, got {value!r:.40} for {key}")
        if not -100 <= value <= 100:
            raise invalid("logit_bias", f"values must be in [-100, 100], got {value} for "
                          f"token {key}")
        msg.sampling.logit_bias[int(key)] = float(value)


def _response_format(msg: Any, b: _Sampling) -> None:
    """OpenAI's response_format, or vLLM's structured_outputs, into msg.response_format."""
    rf, so = b.response_format, b.structured_outputs
    if rf is not None and so:
        raise invalid("response_format", "give response_format or structured_outputs, not both")
    out = msg.response_format
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            out.json_object = True
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise invalid("response_format", "json_schema needs {\"json_schema\": "
                              "{\"name\": ..., \"schema\": {...}}}")
            out.json_schema = json.dumps(schema)
        elif kind != "text":
            raise invalid("response_format", f"type must be text, json_object or json_schema, "
                          f"got {str(kind)[:40]!r}")
        return
    if not so:
        return
    keys = [k for k in ("json", "regex", "choice") if so.get(k) is not None]
    if len(keys) != 1:
        raise invalid("structured_outputs", "give exactly one of json, regex, choice")
    value = so[keys[0]]
    if keys[0] == "json":
        out.json_schema = value if isinstance(value, str) else json.dumps(value)
    elif keys[0] == "regex":
        if not isinstance(value, str):
            raise invalid("structured_outputs", "regex must be a string")
        out.regex = value
    else:
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise invalid("structured_outputs", "choice must be a list of strings")
        out.choice.choices.extend(value)


def _common(msg: Any, b: _Sampling, names: dict[str, str]) -> None:
    if b.n is not None:
        if not 1 <= b.n <= MAX_N:
            raise invalid("n", f"must be in [1, {MAX_N}], got {b.n}")
        msg.n = b.n
    if b.logit_bias:
        _logit_bias(msg, b.logit_bias)
    _response_format(msg, b)
    s, st = msg.sampling, msg.stopping
    if b.temperature is not None:
        s.temperature = b.temperature
    if b.top_p is not None:
        s.top_p = b.top_p
    if b.top_k is not None:
        s.top_k = max(b.top_k, 0)  # vLLM: -1 (or 0) is off
    if b.min_p is not None:
        s.min_p = b.min_p
    if b.repetition_penalty is not None:
        s.repetition_penalty = b.repetition_penalty
    if b.presence_penalty is not None:
        s.presence_penalty = b.presence_penalty
    if b.frequency_penalty is not None:
        s.frequency_penalty = b.frequency_penalty
    if b.seed is not None:
        s.seed = b.seed
    if b.stop is not None:
        st.stop_sequences.extend([b.stop] if isinstance(b.stop, str) else b.stop)
    if b.stop_token_ids:
        st.stop_token_ids.extend(b.stop_token_ids)
    if b.min_tokens is not None:
        st.min_new_tokens = b.min_tokens
    if b.ignore_eos:
        st.ignore_eos = True
    if b.include_stop_str_in_output:
        st.include_stop_sequence = True
    if b.truncate_prompt_tokens:
        msg.truncate_prompt_tokens = b.truncate_prompt_tokens
    if b.priority is not None:
        msg.priority = b.priority
    names.update({"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                  "stop_sequences": "stop", "include_stop_sequence": "include_stop_str_in_output",
                  "stop": "stop", "response_format.json_schema": "response_format",
                  "response_format.json_object": "response_format",
                  "response_format.regex": "structured_outputs",
                  "response_format.choice": "structured_outputs"})


def completion(b: CompletionRequest) -> Translated:
    if b.best_of not in (None, 1):
        raise invalid("best_of", f"only best_of=1 is supported (got {b.best_of})")
    if b.echo:
        raise invalid("echo", "is not supported")
    if b.suffix:
        raise invalid("suffix", "is not supported")
    msg = pb.GenerateRequest()
    names: dict[str, str] = {}
    _common(msg, b, names)
    msg.stopping.max_new_tokens = (COMPLETION_DEFAULT_MAX_TOKENS if b.max_tokens is None
                                   else b.max_tokens)
    if b.logprobs is not None:
        msg.options.logprobs = True
        msg.options.top_logprobs = b.logprobs
        names["top_logprobs"] = "logprobs"
    prompt, ids = b.prompt, None
    if isinstance(prompt, list):
        if len(prompt) == 0:
            raise invalid("prompt", "must not be empty")
        if isinstance(prompt[0], list) or (isinstance(prompt[0], str) and len(prompt) > 1):
            raise invalid("prompt", "one prompt per request is supported (got a batch of "
                          f"{len(prompt)}); send one request per prompt")
        if isinstance(prompt[0], str):
            prompt = prompt[0]
        else:
            ids, prompt = list(prompt), None
    return Translated(msg, prompt, ids, names)


def _content(i: int, m: Any) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{i}].content[{j}]", "only text parts are supported")
        parts.append(part.text)
    return "\n".join(parts)


def chat(b: ChatRequest) -> Translated:
    if b.tools:
        raise invalid("tools", "are not supported")
    if b.top_logprobs is not None and not b.logprobs:
        raise invalid("top_logprobs", "needs logprobs=true")
    msg = pb.ChatRequest()
    for i, m in enumerate(b.messages):
        msg.messages.append(pb.ChatMessage(role=m.role, content=_content(i, m)))
    names: dict[str, str] = {"prompt": "messages"}
    _common(msg, b, names)
    if b.max_completion_tokens is not None:
        msg.stopping.max_new_tokens = b.max_completion_tokens
        names_max = "max_completion_tokens"
    else:
        if b.max_tokens is not None:
            msg.stopping.max_new_tokens = b.max_tokens
        names_max = "max_tokens"
    names["max_new_tokens"] = names_max
    if b.logprobs:
        msg.options.logprobs = True
        msg.options.top_logprobs = b.top_logprobs or 0
    return Translated(msg, None, None, names)


_FIELD = re.compile(r"[a-z_]+")


def openai_error(e: InvalidArgument | ValueError, names: dict[str, str]) -> HttpError:
    """A validation failure of api/convert.py (proto field names) as a 400 naming the body's
    field: `stopping.max_new_tokens: must be in [1, 24]` -> `max_tokens: must be ...`."""
    text = str(e)
    field_, _, rest = text.partition(": ")
    if not isinstance(e, InvalidArgument):
        field_, rest = "", text
    elif field_ in ("sampling", "stopping"):  # "sampling: temperature must be ..."
        m = _FIELD.match(rest)
        field_ = m.group(0) if m else field_
        rest = rest[len(field_):].lstrip() if m else rest
    if field_.startswith(("sampling.", "stopping.", "options.")):
        field_ = field_.split(".", 1)[1]
    param = names.get(field_, field_) or None

    def rename(m: re.Match) -> str:
        return names.get(m.group(0), m.group(0))

    rest = re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", rename, rest) \
        if names else rest
    return invalid(param, rest)


# ---------------------------------------------------------------- responses


def finish_reason(r: Any) -> str:
    return FINISH.get(r.finish_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _tok(tokenizer: Any, tid: int) -> str:
    return tokenizer.decode([tid])


def completion_logprobs(tokenizer: Any, ids: list[int], lps: list[float] | None,
                        tops: list[Any] | None, offset: int = 0) -> CompletionLogprobs:
    tokens = [_tok(tokenizer, t) for t in ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = None
    if tops is not None:
        top = [{_tok(tokenizer, i): lp for i, lp in (row or [])} for row in tops]
    return CompletionLogprobs(tokens=tokens, token_logprobs=list(lps or [None] * len(ids)),
                              top_logprobs=top, text_offset=offsets)


def _top(tokenizer: Any, tid: int, lp: float) -> TopLogprob:
    text = _tok(tokenizer, tid)
    return TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))


def chat_logprobs(tokenizer: Any, ids: list[int], lps: list[float] | None,
                  tops: list[Any] | None) -> ChatLogprobs:
    out = []
    for k, tid in enumerate(ids):
        t = _top(tokenizer, tid, (lps or [0.0] * len(ids))[k])
        row = (tops[k] if tops is not None else None) or []
        out.append(TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                                top_logprobs=[_top(tokenizer, i, lp) for i, lp in row]))
    return ChatLogprobs(content=out)
