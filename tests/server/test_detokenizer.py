"""Tests for shardserve_server.engine.detokenizer on a tiny byte-level BPE trained here."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shardserve_server.engine.detokenizer import IncrementalDetokenizer

EOT = "<|endoftext|>"
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "日本語のテキストと中文文本，你好世界。",
    "emoji 😀🎉👍🏽 and flags 🇯🇵 and more 😀😀",
    "naïve café résumé, Ελληνικά, русский текст",
]


@functools.cache
def _tokenizer() -> Tokenizer:
    """Byte-level BPE with ~300 tokens: most multi-byte characters span several tokens, and
    some merges join the tail of one character to the next one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 10, trainer)
    return tok


def _run(
    ids: Sequence[int], prompt: Sequence[int] = (), skip_special_tokens: bool = False
) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(_tokenizer(), prompt, skip_special_tokens=skip_special_tokens)
    return [detok.add_token(i) for i in ids], detok


def test_the_tokenizer_splits_characters_across_tokens() -> None:
    tok = _tokenizer()
    assert tok.get_vocab_size() == 300
    ids = tok.encode("日本語😀").ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == "日本語😀"


def test_split_character_is_held_until_complete() -> None:
    tok = _tokenizer()
    ids = tok.encode("a😀").ids
    pieces, detok = _run(ids)
    assert "".join(pieces) == "a😀"
    assert "" in pieces  # some token completed nothing
    assert all("\ufffd" not in p for p in pieces)
    assert detok.text == "a😀"
    assert detok.generated_token_ids == ids


def test_prompt_gives_context_and_is_not_emitted() -> None:
    tok = _tokenizer()
    prompt = tok.encode("The quick brown").ids
    ids = tok.encode(" fox jumps 你好").ids
    pieces, detok = _run(ids, prompt)
    assert "".join(pieces) == " fox jumps 你好"
    assert detok.text == " fox jumps 你好"


def test_special_tokens() -> None:
    tok = _tokenizer()
    eot = tok.token_to_id(EOT)
    ids = [*tok.encode("hi 😀").ids, eot, *tok.encode(" bye").ids]
    for skip in (False, True):
        pieces, _ = _run(ids, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert EOT not in tok.decode(ids, skip_special_tokens=True)


def test_flush_releases_an_unfinished_character() -> None:
    tok = _tokenizer()
    ids = tok.encode("ok 🦀").ids  # not in the corpus: one byte per token
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    pieces, detok = _run(ids[:cut])
    tail = detok.flush()
    assert "".join(pieces) + tail == tok.decode(ids[:cut])
    assert tail.endswith("\ufffd")
    assert detok.flush() == ""


class _SentencePieceLike:
    """Decodes like SentencePiece: "▁" is a space, and the leading space of the text goes."""

    vocab = {0: "▁Hello", 1: "▁world", 2: "!", 3: "▁again"}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_context_keeps_leading_spaces() -> None:
    detok = IncrementalDetokenizer(_SentencePieceLike(), prompt_token_ids=[0])
    assert [detok.add_token(i) for i in (1, 2, 3)] == [" world", "!", " again"]
    fresh = IncrementalDetokenizer(_SentencePieceLike())
    assert [fresh.add_token(i) for i in (0, 1)] == ["Hello", " world"]


# Single characters and multi-codepoint clusters (skin tone, flag, ZWJ family, combining mark).
_EXOTIC = [*"日本語中文你好世界😀🎉éñßΩжא", "👍🏽", "🇯🇵", "👨\u200d👩\u200d👧", "e\u0301"]
_TEXT = st.lists(
    st.one_of(
        st.characters(codec="utf-8", exclude_characters="\ufffd"),
        st.sampled_from(_EXOTIC),
        st.sampled_from(list("abc ")),
    ),
    max_size=30,
).map("".join)


@settings(deadline=None, max_examples=50)
@given(prompt_text=_TEXT, text=_TEXT)
def test_pieces_concatenate_to_the_full_decode(prompt_text: str, text: str) -> None:
    tok = _tokenizer()
    prompt = tok.encode(prompt_text).ids
    ids = tok.encode(text).ids
    full = tok.decode(ids)
    assert full == text  # byte-level BPE round-trips
    pieces, detok = _run(ids, prompt)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == full
    assert detok.text == full
    assert detok.flush() == ""


@settings(deadline=None, max_examples=50)
@given(ids=st.lists(st.integers(min_value=0, max_value=299), max_size=30))
def test_random_token_ids_never_lose_text(ids: list[int]) -> None:
    # Arbitrary ids may form invalid UTF-8; add_token + flush must still add up to the decode.
    pieces, detok = _run(ids)
    assert "".join(pieces) + detok.flush() == _tokenizer().decode(ids, skip_special_tokens=False)
