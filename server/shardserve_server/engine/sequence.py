"""One request's generation state: prompt, generated ids, sampler RNG, detokenizer, stop checker.

Shared by the single-process engine and the batching scheduler, so that the rules for
appending a token (penalty history, stop tokens, stop strings, streamed text) live in one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenizer import IncrementalDetokenizer
from .grammar import Constraint
from .sampling import SamplingParams, make_generator
from .stopping import FinishReason, StopChecker, StoppingParams


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for: prompt token ids plus sampling and stopping parameters."""

    prompt_ids: tuple[int, ...]
    """Prompt token ids (already tokenised, BOS included when the model wants one)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How each next token is chosen."""
    stopping: StoppingParams = field(default_factory=StoppingParams)
    """When generation ends."""
    request_id: str = ""
    """Caller's id for logs and cancellation."""
    logprobs: int | None = None
    """None: no logprobs; 0: the chosen token's; N: also the top-N alternatives."""
    constraint: Constraint | None = None
    """Structured output: the language the generated text must stay in (None: free)."""


@dataclass
class TokenEvent:
    """One generated token as streamed to a caller."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None
    """Why the request failed (finish_reason ERROR only)."""
    cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache (their prefill was skipped)."""
    stop_reason: str | int | None = None
    """With STOP_SEQUENCE: the stop string or stop token id that matched (vLLM's
    stop_reason); None otherwise."""


class Sequence:
    """Mutable per-request state while it generates."""

    def __init__(self, req: GenerationRequest, tokenizer: Any, eos_token_ids: tuple[int, ...]):
        if not req.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        self.req = req
        self.prompt_ids = list(req.prompt_ids)
        self.output_ids: list[int] = []
        self.generator: torch.Generator = make_generator(req.sampling.seed)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=self.prompt_ids)
        self.stop = StopChecker(req.stopping, eos_token_ids)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.created = time.monotonic()
        self.cached_tokens = 0
        self.matcher: Any = None
        """The grammar matcher of a constrained request (set by the scheduler), fed every
        generated token."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Tokens in the cache once the last sampled token is fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    def append(
        self,
        token_id: int,
        logprob: float | None = None,
        top: list[tuple[int, float]] | None = None,
    ) -> TokenEvent:
        """Record a sampled token; updates text and finish_reason."""
        self.output_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        n = len(self.output_ids)
        # a grammar that took EOS is complete: EOS ends the request even before
        # min_new_tokens (the mask allowed nothing else) or with ignore_eos
        grammar_end = self.matcher is not None and token_id in self.eos_token_ids
        stops_here = grammar_end or (
            n >= self.req.stopping.min_new_tokens and self._is_stop_token(token_id))
        piece = "" if stops_here else self.detok.add_token(token_id)  # EOS text is not output
        if stops_here or n >= self.req.stopping.max_new_tokens:
            # The last token: release what the detokenizer still holds back (an unfinished
            # UTF-8 character, as U+FFFD), so that text == decode(the output ids, minus EOS).
            piece += self.detok.flush()
        # Text first (a stop string may end the request), then the token rules; the other
        # order would drop the last token's text when it reaches max_new_tokens.
        emitted, text_reason = self.stop.process_text(piece)
        reason = text_reason or self.stop.check_token(token_id, n)
        if grammar_end and text_reason is None:
            reason = FinishReason.EOS
        if reason is not None and text_reason is None:
            emitted += self.stop.flush()
        self.text += emitted
        if reason is not None:
            self.finish_reason = reason
        if self.matcher is not None and not self.finished:
            if not self.matcher.accept_token(token_id):
                self.fail(f"token {token_id} breaks the response format (grammar rejected it)")
        return TokenEvent(token_id, emitted, logprob, top)

    def _is_stop_token(self, token_id: int) -> bool:
        eos = token_id in self.eos_token_ids and not self.req.stopping.ignore_eos
        return eos or token_id in self.req.stopping.stop_token_ids

    def finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.text += self.stop.flush() if reason is not FinishReason.CANCELLED else ""
            self.finish_reason = reason

    def fail(self, message: str) -> None:
        """End with FinishReason.ERROR; `message` says why (sent to the caller)."""
        if self.finish_reason is None:
            self.error = message
            self.finish(FinishReason.ERROR)

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        want = self.req.logprobs is not None
        return GenerationResult(
            request_id=self.req.request_id,
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            logprobs=list(self.logprobs) if want else None,
            top_logprobs=list(self.top_logprobs) if want and self.req.logprobs else None,
            error=self.error,
            cached_tokens=self.cached_tokens,
            stop_reason=self.stop.matched_stop
            if self.finish_reason is FinishReason.STOP_SEQUENCE else None,
        )
