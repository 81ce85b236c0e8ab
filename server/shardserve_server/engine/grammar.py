"""Structured output: compile a constraint with xgrammar, one matcher per sequence, row masks.

    backend = GrammarBackend(tokenizer.tokenizer.to_str(), vocab_size=49152, stop_token_ids=(2,))
    backend.check(Constraint("json_schema", schema_text))     # ValueError names what is wrong
    matcher = backend.matcher(constraint)                      # per sequence, in the leader
    bitmask = backend.fill([m0, m3], rows=[0, 3], batch=B)      # int32 [B, ceil(V / 32)]
    backend.apply(x, [0, 3], bitmask)                           # x [B, V]: banned tokens -inf

A constraint (a JSON schema, any JSON object, a regex, or a choice of strings) becomes a
grammar compiled against the served tokenizer; its matcher follows the sequence's tokens and
yields, before every step, the bitmask of tokens that keep the text inside the language. The
scheduler applies the masks of the constrained rows of a batch inside the batched sampler, so
constrained and free rows share one step. Once the text is complete only the EOS ids are
allowed, so the request ends with EOS.

Why xgrammar: on SmolLM2's 49,152-token vocabulary and a nested schema (enum, pattern,
bounded integer and array, nested object) its per-step mask took 2-3 us median, 22-37 us at
p90 and 125 us at most; llguidance 33-39 us median, 345-520 us p90, up to 6 ms; outlines-core
is ~1 us per step but took 1.3-1.8 s to compile the schema's index (every new schema would
stall the step loop). xgrammar compiled it in 24 ms (cached after). Figures and command:
loadtest/results/structured.md (loadtest/bench_structured.py --part mask).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_SPEC_CHARS = 64 * 1024
"""Largest JSON schema or regex accepted (compile time grows with it)."""
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024


@dataclass(frozen=True)
class Constraint:
    """What the generated text must be. Check with `validate()`; compile errors come from
    `GrammarBackend.check`."""

    kind: str
    """One of KINDS."""
    spec: str | tuple[str, ...] = ""
    """json_schema: the schema as JSON text; regex: the pattern; choice: the strings;
    json_object: unused."""

    def validate(self) -> None:
        """Raise ValueError naming what is wrong (sizes and types; not the grammar)."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not isinstance(self.spec, tuple) or not 1 <= len(self.spec) <= MAX_CHOICES:
                raise ValueError(f"choice needs 1 to {MAX_CHOICES} strings")
            for c in self.spec:
                if not isinstance(c, str) or not 1 <= len(c) <= MAX_CHOICE_CHARS:
                    raise ValueError(f"each choice must have 1 to {MAX_CHOICE_CHARS} characters")
        elif self.kind in ("json_schema", "regex"):
            if not isinstance(self.spec, str) or not 1 <= len(self.spec) <= MAX_SPEC_CHARS:
                raise ValueError(f"{self.kind} must have 1 to {MAX_SPEC_CHARS} characters")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("json_schema must be a JSON object (or true/false)")


_LOOSE_CHAR = r'[^\"\\\r\n]'
_JSON_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _json_grammar(xgr: Any, schema: str) -> Any:
    """The schema's grammar, compact (no optional whitespace, "," and ":" separators).

    xgrammar 0.2.9 writes a length-bounded string (maxLength/minLength) as characters
    `[^"\\\r\n]`, which lets raw control characters through (invalid JSON: strict parsers
    reject them); its unbounded strings exclude \0-\x1f as JSON requires. The EBNF is
    patched to exclude them everywhere."""
    g = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    return xgr.Grammar.from_ebnf(str(g).replace(_LOOSE_CHAR, _JSON_CHAR))


def _choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose root is exactly one of the strings (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarBackend:
    """xgrammar's compiler over one tokenizer; compiled grammars are cached by constraint.

    Thread-safe: the HTTP and gRPC front ends validate from the event loop thread while the
    leader compiles in its own process (each process has its own backend)."""

    def __init__(self, tokenizer_json: str, vocab_size: int,
                 stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        vocab = [""] * vocab_size
        for text, i in tok.get_vocab(with_added_tokens=True).items():
            if 0 <= i < vocab_size:
                vocab[i] = text
        # what TokenizerInfo.from_huggingface detects, without needing transformers
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
        self.info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size,
                                      stop_token_ids=list(stop_token_ids) or None,
                                      add_prefix_space=meta["add_prefix_space"])
        self.vocab_size = vocab_size
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._lock = threading.Lock()

    def compile(self, c: Constraint) -> Any:
        """The compiled grammar of `c`; ValueError when the schema or regex is unusable."""
        c.validate()
        try:
            with self._lock:
                if c.kind in ("json_schema", "json_object"):
                    schema = c.spec if c.kind == "json_schema" else '{"type": "object"}'
                    return self._compiler.compile_grammar(_json_grammar(self._xgr, schema))
                if c.kind == "regex":
                    return self._compiler.compile_regex(c.spec)
                return self._compiler.compile_grammar(_choice_grammar(c.spec))
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with the reason
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{c.kind} cannot be compiled: {first[:300]}") from None

    def check(self, c: Constraint) -> None:
        """Raise ValueError if `c` is invalid or does not compile (the edge's validation)."""
        self.compile(c)

    def matcher(self, c: Constraint) -> Any:
        """A fresh matcher (per sequence) at the start of the language."""
        return self._xgr.GrammarMatcher(self.compile(c))

    def fill(self, matchers: Sequence[Any], rows: Sequence[int], batch: int) -> torch.Tensor:
        """The batch's next-token bitmask: int32 [batch, ceil(V / 32)], bit t of row r set
        when token t is allowed; row rows[i] from matchers[i], the other rows allow all."""
        bitmask = self._xgr.allocate_token_bitmask(batch, self.vocab_size)  # [B, W], all set
        for r, m in zip(rows, matchers, strict=True):
            m.fill_next_token_bitmask(bitmask, r)
        return bitmask

    def apply(self, x: torch.Tensor, rows: list[int], bitmask: torch.Tensor,
              before: torch.Tensor | None = None) -> None:
        """Set x [B, V] (float32, written in place) to -inf at every token the bitmask bans
        in `rows` (xgrammar's CPU kernel: one pass, no [B, V] temporaries). Columns past the
        grammar's vocabulary (a vocabulary padded for tensor parallelism) are banned too.

        `before` [B, V]: the logits before the min_new_tokens suppression. A row the mask
        would leave empty (its grammar wants EOS while min_new_tokens still bans it) is masked
        from `before` instead: the grammar wins, since any other token would break the
        format."""
        vocab = min(self.vocab_size, x.shape[1])
        self._xgr.apply_token_bitmask_inplace(x, bitmask, vocab_size=vocab, indices=rows)
        if x.shape[1] > vocab:
            x[rows, vocab:] = float("-inf")
        if before is not None:
            empty = torch.isneginf(x[rows]).all(dim=1).tolist()  # [R]
            redo = [r for r, e in zip(rows, empty, strict=True) if e]
            if redo:
                x[redo] = before[redo].float()
                self._xgr.apply_token_bitmask_inplace(x, bitmask, vocab_size=vocab,
                                                      indices=redo)
