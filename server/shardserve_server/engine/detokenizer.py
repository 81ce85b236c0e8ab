"""Incremental detokenization: turn a stream of token ids into a stream of text pieces.

Decoding one token at a time is wrong in two ways: a token's text can depend on the tokens
before it (SentencePiece drops the leading space of the first token it decodes), and with
byte-level BPE one character can be split across tokens, so a lone token decodes to U+FFFD.
The offset scheme of vLLM and TGI fixes both: keep two offsets into the token ids,

    prefix_offset .. read_offset   tokens already emitted, decoded again as context
    read_offset .. end             tokens not emitted yet

decode [prefix_offset:] and [prefix_offset:read_offset], and emit the difference once the
longer one no longer ends in U+FFFD (an unfinished character); then both offsets move up.
For byte-level BPE the emitted pieces concatenate to `decode(generated ids)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context before the first generated token (as in vLLM and TGI).
_PROMPT_CONTEXT = 5


class Decoder(Protocol):
    """What the detokenizer needs of a tokenizer (a `tokenizers.Tokenizer` has it)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Detokenizes one request's generated tokens as they arrive."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._prefix_offset = max(self._num_prompt - _PROMPT_CONTEXT, 0)
        self._read_offset = self._num_prompt
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def generated_token_ids(self) -> list[int]:
        """The generated token ids added so far."""
        return self._ids[self._num_prompt :]

    def add_token(self, token_id: int) -> str:
        """Add the next generated token; return the text it completes ("" while a character
        is still unfinished or the token decodes to nothing)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        piece = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Emit whatever is still held back (at the end of the request), even an unfinished
        character as U+FFFD, so that the pieces add up to the full decode."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        piece = new_text[len(prefix_text) :]
        if piece:
            self._pieces.append(piece)
        return piece

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
