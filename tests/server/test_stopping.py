"""Tests for shardserve_server.engine.stopping: token checks and stop strings on a text stream."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardserve_server.engine.stopping import FinishReason, StopChecker, StoppingParams

EOS = 2


def _stream(checker: StopChecker, chunks: list[str]) -> tuple[list[str], FinishReason | None]:
    """Feed chunks until a stop; flush at the end if none. Returns the emitted pieces."""
    pieces: list[str] = []
    for chunk in chunks:
        text, reason = checker.process_text(chunk)
        pieces.append(text)
        if reason is not None:
            return pieces, reason
    pieces.append(checker.flush())
    return pieces, None


# --- stop strings ---------------------------------------------------------------------------


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    checker = StopChecker(StoppingParams(stop=("STOP",)))
    assert checker.process_text("Hello S") == ("Hello ", None)
    assert checker.held_text == "S"
    assert checker.process_text("T") == ("", None)
    assert checker.process_text("O") == ("", None)
    assert checker.process_text("P and more") == ("", FinishReason.STOP_SEQUENCE)
    assert checker.finish_reason is FinishReason.STOP_SEQUENCE
    assert checker.matched_stop == "STOP"
    assert checker.flush() == ""
    assert checker.process_text("anything") == ("", FinishReason.STOP_SEQUENCE)


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    checker = StopChecker(StoppingParams(stop=("</end>",)))
    pieces, reason = _stream(checker, ["a </", "en", "x> b </e"])
    assert reason is None
    assert pieces == ["a ", "", "</enx> b ", "</e"]
    assert "".join(pieces) == "a </enx> b </e"


def test_text_before_the_stop_in_the_same_chunk_is_emitted() -> None:
    checker = StopChecker(StoppingParams(stop=("\n\n",)))
    pieces, reason = _stream(checker, ["line one\n", "\nline two"])
    assert reason is FinishReason.STOP_SEQUENCE
    assert "".join(pieces) == "line one"


def test_earliest_stop_wins() -> None:
    checker = StopChecker(StoppingParams(stop=("world", "hello")))
    assert checker.process_text("say hello world") == ("say ", FinishReason.STOP_SEQUENCE)
    assert checker.matched_stop == "hello"


def test_overlapping_stops_first_to_complete_wins() -> None:
    # Character by character, "bc" is complete before "abcd": the result must not depend on
    # whether the text came as one token or four.
    for chunks in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        checker = StopChecker(StoppingParams(stop=("abcd", "bc")))
        pieces, reason = _stream(checker, chunks)
        assert (("".join(pieces)), reason, checker.matched_stop) == (
            "a",
            FinishReason.STOP_SEQUENCE,
            "bc",
        )


def test_include_stop_str_in_output() -> None:
    params = StoppingParams(stop=("###",), include_stop_str_in_output=True)
    checker = StopChecker(params)
    pieces, reason = _stream(checker, ["answer: 4", "#", "## trailing"])
    assert reason is FinishReason.STOP_SEQUENCE
    assert "".join(pieces) == "answer: 4###"


def test_no_stop_strings_passes_text_through() -> None:
    checker = StopChecker(StoppingParams())
    assert checker.process_text("anything at all") == ("anything at all", None)
    assert checker.flush() == ""


def _reference(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, bool]:
    """Check after every character: the first stop string to complete ends the text."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)  # same end: the one that starts first
            return (text[:end] if include else text[: end - len(stop)]), True
    return text, False


@settings(deadline=None, max_examples=200)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    include=st.booleans(),
)
def test_any_chunking_matches_the_character_reference(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    params = StoppingParams(stop=tuple(stops), include_stop_str_in_output=include)
    pieces, reason = _stream(StopChecker(params), chunks)
    expected, stopped = _reference(text, tuple(stops), include)
    assert "".join(pieces) == expected
    assert (reason is FinishReason.STOP_SEQUENCE) == stopped
    if not include:
        # Not even a prefix of a stop string that did match is ever shown after the cut.
        assert all(s not in "".join(pieces) for s in stops)


# --- token checks ---------------------------------------------------------------------------


def test_eos_stops() -> None:
    checker = StopChecker(StoppingParams(), eos_token_ids=[EOS])
    assert checker.check_token(5, 1) is None
    assert checker.check_token(EOS, 2) is FinishReason.EOS
    assert checker.matched_stop == EOS


def test_min_new_tokens_suppresses_eos() -> None:
    checker = StopChecker(StoppingParams(min_new_tokens=3, stop_token_ids=(7,)), [EOS])
    assert checker.check_token(EOS, 1) is None
    assert checker.check_token(7, 2) is None
    assert checker.check_token(EOS, 3) is FinishReason.EOS


def test_suppressed_token_ids_for_masking() -> None:
    checker = StopChecker(StoppingParams(min_new_tokens=2, stop_token_ids=(7,)), [EOS, 3])
    assert checker.suppressed_token_ids(0) == {EOS, 3, 7}
    assert checker.suppressed_token_ids(1) == frozenset()


def test_ignore_eos_keeps_stop_token_ids() -> None:
    checker = StopChecker(StoppingParams(ignore_eos=True, stop_token_ids=(9,)), [EOS])
    assert checker.check_token(EOS, 1) is None
    assert checker.check_token(9, 2) is FinishReason.STOP_SEQUENCE
    assert checker.matched_stop == 9


def test_max_tokens() -> None:
    checker = StopChecker(StoppingParams(max_new_tokens=3), [EOS])
    assert checker.check_token(10, 1) is None
    assert checker.check_token(11, 2) is None
    assert checker.check_token(12, 3) is FinishReason.MAX_TOKENS
    assert checker.matched_stop is None


def test_eos_wins_over_max_tokens_on_the_last_token() -> None:
    checker = StopChecker(StoppingParams(max_new_tokens=2), [EOS])
    assert checker.check_token(EOS, 2) is FinishReason.EOS


def test_flush_after_max_tokens_releases_held_text() -> None:
    checker = StopChecker(StoppingParams(max_new_tokens=2, stop=("<|im_end|>",)))
    assert checker.process_text("hi <|im") == ("hi ", None)
    assert checker.check_token(4, 2) is FinishReason.MAX_TOKENS
    assert checker.flush() == "<|im"


# --- params ---------------------------------------------------------------------------------


def test_finish_reason_values() -> None:
    assert [r.value for r in FinishReason] == [
        "max_tokens",
        "eos",
        "stop_sequence",
        "time_limit",
        "cancelled",
        "error",
    ]
    assert FinishReason.EOS == "eos"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
        ({"stop": "STOP"}, "stop"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop_token_ids": [1]}, "stop_token_ids"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):  # validated when made: never in use
        StoppingParams(**kwargs)  # type: ignore[arg-type]


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        StoppingParams().max_new_tokens = 3  # type: ignore[misc]
