"""pydantic models of the OpenAI-compatible request and response bodies.

Requests are validated strictly (no string-to-number coercion; an int is accepted where a
float is expected, as JSON makes no difference) and unknown fields are ignored, as OpenAI and
vLLM do. Bounds here are only the wire types' (what fits the shardserve.v1 fields); the
ranges that matter (temperature >= 0, max_tokens within the server's limit, ...) are checked
by the same code as the gRPC API's (api/convert.py), so the rules live in one place.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
MAX_STOP_ITEMS = 64  # the wire bound; convert.py allows 16 and says so


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None
    """A last chunk (empty choices) carries `usage`."""
    continuous_usage_stats: bool | None = None
    """vLLM: every chunk carries the usage so far."""


class _Sampling(_Body):
    """Fields that completions and chat share (OpenAI's and vLLM's extensions)."""

    model: str | None = None
    """Must be the served model's name (GET /v1/models); unset means that model."""
    max_tokens: U32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_ITEMS)] | None = None
    seed: U64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=2**32 - 1)] | None = None
    """-1 or 0: off."""
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: U32 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[U32], Field(max_length=MAX_STOP_ITEMS)] | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: U32 | None = None
    priority: I32 | None = None
    response_format: dict[str, Any] | None = None
    """{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}}"""
    structured_outputs: dict[str, Any] | None = None
    """vLLM's: {"json": schema} or {"regex": pattern} or {"choice": [strings]}."""


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: U32 | None = None
    """Return the top-N alternatives per token (0: only the sampled token's logprob)."""
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: U32 | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    tools: list[Any] | None = None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens served from the prefix cache (their prefill was skipped)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """vLLM's: the stop string or stop token id that ended the choice (None: EOS, length)."""


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shardserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
