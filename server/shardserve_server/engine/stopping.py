"""Stopping: when a request is done, and which part of its text stream may be shown.

One `StopChecker` per request. The step loop calls `check_token` with every new token (EOS,
stop token ids, the token budget) and `process_text` with every new piece of detokenized text
(stop strings). A stop string can arrive split across tokens, so `process_text` holds back any
tail of the text that could still grow into a stop string; the client never sees a stop string
(unless `include_stop_str_in_output`), not even its first half. When a request ends for another
reason, `flush` releases the held-back tail.

A stop string matches as soon as it is complete: with several candidates, the one that ends
first wins (ties: the one that starts first). This is what checking after every character would
give, so the result does not depend on how the text was split into tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """Why a request stopped generating."""

    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class StoppingParams:
    """When one request stops. Validated when made (`__post_init__`): an instance always
    holds allowed values, so nothing downstream checks them again."""

    max_new_tokens: int = 64
    """Stop with MAX_TOKENS once this many tokens have been generated; at least 1."""

    min_new_tokens: int = 0
    """EOS and stop token ids do not end the request before this many tokens (the EOS or stop
    token itself included) have been generated. Stop strings are not affected."""

    stop: tuple[str, ...] = ()
    """Stop strings, matched on the detokenized output; each non-empty."""

    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (STOP_SEQUENCE), besides the model's EOS ids."""

    ignore_eos: bool = False
    """Keep generating past the model's EOS ids (stop_token_ids still apply)."""

    include_stop_str_in_output: bool = False
    """Emit the matched stop string at the end of the output instead of dropping it."""

    time_limit_s: float | None = None
    """Stop with TIME_LIMIT once this many seconds passed since the request was admitted."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field with a bad value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(
                f"stop_token_ids must be a tuple of ints, got {type(self.stop_token_ids).__name__}"
            )
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {t!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 (or unset), got {self.time_limit_s!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StopChecker:
    """The stop state of one request: token checks and the held-back text of stop strings."""

    def __init__(self, params: StoppingParams, eos_token_ids: Iterable[int] = ()) -> None:
        self.params = params
        self._eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = params.stop
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.finish_reason: FinishReason | None = None
        """Set once a check has ended the request."""
        self.matched_stop: str | int | None = None
        """The stop string or token id that ended the request, if one did."""

    @property
    def held_text(self) -> str:
        """Text received but not emitted yet, because it could be the start of a stop string."""
        return self._held

    def suppressed_token_ids(self, num_generated: int) -> frozenset[int]:
        """Ids that `check_token` would not stop on for the next token (the one after
        `num_generated` tokens), for a step loop that masks them out of the logits."""
        if num_generated + 1 < self.params.min_new_tokens:
            return self._eos | self._stop_ids
        return frozenset()

    def check_token(self, token_id: int, num_generated: int) -> FinishReason | None:
        """The reason to stop after `token_id`, or None; `num_generated` counts it.

        EOS (unless ignore_eos) and stop token ids count only once num_generated >=
        min_new_tokens; they win over MAX_TOKENS when both apply.
        """
        if self.finish_reason is not None:
            return self.finish_reason
        if num_generated >= self.params.min_new_tokens:
            if token_id in self._eos:
                return self._finish(FinishReason.EOS, token_id)
            if token_id in self._stop_ids:
                return self._finish(FinishReason.STOP_SEQUENCE, token_id)
        if num_generated >= self.params.max_new_tokens:
            return self._finish(FinishReason.MAX_TOKENS, None)
        return None

    def process_text(self, new_text: str) -> tuple[str, FinishReason | None]:
        """Take the next piece of output text: (text safe to show now, STOP_SEQUENCE or None).

        On a stop string the text is cut there (after it if include_stop_str_in_output) and the
        request is finished; later calls return ("", the finish reason).
        """
        if self.finish_reason is not None:
            return "", self.finish_reason
        if not self._stops:
            return new_text, None
        # Everything emitted so far has no suffix that starts a stop string, so a match can
        # only start inside the held-back text or the new text.
        text = self._held + new_text
        match = self._earliest_stop(text)
        if match is not None:
            start, stop = match
            self._held = ""
            end = start + len(stop) if self.params.include_stop_str_in_output else start
            self._finish(FinishReason.STOP_SEQUENCE, stop)
            return text[:end], FinishReason.STOP_SEQUENCE
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Release the held-back text (the request ended for a reason other than a stop
        string, whose tail turned out not to be one)."""
        held, self._held = self._held, ""
        return held

    def _finish(self, reason: FinishReason, matched: str | int | None) -> FinishReason:
        self.finish_reason = reason
        self.matched_stop = matched
        return reason

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first (then starts first), or None."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_stop_len - 1), 0, -1):
            tail = text[len(text) - n :]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
