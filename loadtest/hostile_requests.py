"""Hypothesis strategies over the whole shardserve.v1 request space, and one call driver.

Used by the property test (tests/server/test_hostile_input.py, a few hundred examples in CI)
and by loadtest/fuzz_server.py (thousands, with a status histogram). Every field of
GenerateRequest, ChatRequest and TokenizeRequest is drawn at and beyond its documented range:
0, 1, the limit and the limit + 1, uint32 / uint64 / int32 extremes, NaN, +-inf, -0.0,
denormals, empty and huge strings, NUL bytes, long unicode, special tokens written as text,
duplicate request ids, up to 17 stop sequences, stop ids outside the vocabulary,
min_new_tokens above max_new_tokens, every combination of logprobs / top_logprobs / penalties /
seeds; plus arbitrary bytes on every method (malformed protobuf), and short deadlines.

A call "passes" when it ends OK or with a documented status (ALLOWED); never INTERNAL or
UNKNOWN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
from hypothesis import strategies as st

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb
from shardserve_client._pb.shardserve.v1 import generate_pb2_grpc as pb_grpc

ALLOWED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
})
SERVICE = "/shardserve.v1.TextGeneration/"
METHODS = ("Generate", "GenerateStream", "Chat", "ChatStream", "Tokenize", "ModelInfo")
STREAMING = {"GenerateStream", "ChatStream"}
EXTRA_METHODS = ("/grpc.health.v1.Health/Check",)

U32 = 2**32 - 1
U64 = 2**64 - 1
I32 = 2**31 - 1
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", "<|user|>")


def _edges(*values: int) -> st.SearchStrategy[int]:
    return st.sampled_from(values)


def uint32(limit: int, *more: int) -> st.SearchStrategy[int]:
    """uint32 values around a documented limit, the type's extremes, and anything else."""
    return st.one_of(_edges(0, 1, 2, limit - 1, limit, limit + 1, I32, I32 + 1, U32, *more),
                     st.integers(0, U32))


FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-38, 1e-6, 2.0, 2.0000002, -2.0,
                     -2.0000002, 3.4e38, -3.4e38, float("nan"), float("inf"), float("-inf")]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)


def text(max_size: int = 64) -> st.SearchStrategy[str]:
    """Strings: empty, NUL bytes, long unicode, special tokens as text, or huge."""
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(("", "\x00", "\x00" * 40, "hello\x00world", "🙂" * 300, "東京" * 200,
                         "\u202e\ufeff\u200b", "a" * 5000, " " * 3000, "1 2 3 " * 400)),
        st.lists(st.sampled_from(SPECIAL + ("hi", " ", "\n")), max_size=12).map("".join),
    )


HUGE = st.sampled_from(("x" * 200_000, "ab " * 70_000, "🙂" * 60_000))
PROMPTS = st.one_of(st.sampled_from(("hello", "the quick brown fox", "def add(a, b):", "1 2 3",
                                     "naïve café 東京 🙂")), st.text(min_size=1, max_size=40))
_unit = lambda lo, hi: st.floats(lo, hi)  # noqa: E731 - sent as float32


SCHEMA = json.dumps({"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"], "additionalProperties": False})
GOOD_FORMATS = st.one_of(st.none(), st.sampled_from((
    {"json_object": True}, {"json_schema": SCHEMA}, {"regex": "[a-z]{1,6}"},
    {"choice": ["yes", "no", "maybe"]}, {"json_object": False})))
HOSTILE_FORMATS = st.one_of(
    st.builds(lambda t: {"json_schema": t}, st.one_of(text(40), st.sampled_from((
        "{", "[]", "null", '{"type": "nope"}', '{"$ref": "#/x"}', '{"pattern": "("}',
        '{"type": "string", "minLength": 5, "maxLength": 2}')))),
    st.builds(lambda t: {"regex": t}, st.one_of(text(20), st.sampled_from(
        ("(", "[", "a{2,1}", "*", "(?P<x>a)", "\\", "a" * 70_000)))),
    st.builds(lambda c: {"choice": c}, st.lists(text(8), max_size=300)))


def _fields(limit: int) -> dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]:
    """Every request field: (a value in its documented range, a hostile value). `None` means
    the optional field is left unset."""
    ints = st.integers(-I32 - 1, I32)
    return {
        # SamplingParameters
        "temperature": (st.one_of(st.none(), st.sampled_from((0.0, 0.7, 1.0)), _unit(0, 2)),
                        FLOATS),
        "top_k": (st.sampled_from((0, 1, 5, 50, 319, 320)), uint32(320, 49152, 49153)),
        "top_p": (st.one_of(st.none(), _unit(0.01, 1)), FLOATS),
        "min_p": (st.one_of(st.just(0.0), _unit(0, 1)), FLOATS),
        "repetition_penalty": (st.one_of(st.none(), _unit(0.5, 2)), FLOATS),
        "frequency_penalty": (st.one_of(st.just(0.0), _unit(-2, 2)), FLOATS),
        "presence_penalty": (st.one_of(st.just(0.0), _unit(-2, 2)), FLOATS),
        "seed": (st.one_of(st.none(), st.integers(0, U64)),
                 _edges(0, 1, 2**63 - 1, 2**63, U64)),
        # StoppingCriteria
        "max_new_tokens": (st.one_of(st.none(), st.integers(1, limit)), uint32(limit)),
        "min_new_tokens": (st.integers(0, 6), uint32(limit)),
        "stop_sequences": (st.lists(st.text(min_size=1, max_size=4), max_size=3),
                           st.lists(st.one_of(text(8), st.just("x" * 257)), max_size=17)),
        "stop_token_ids": (st.lists(st.integers(0, 319), max_size=3),
                           st.lists(uint32(320, 49151, 49152), max_size=5)),
        "ignore_eos": (st.booleans(), st.booleans()),
        "time_limit_s": (st.one_of(st.none(), _unit(0.01, 5)), FLOATS),
        "include_stop_sequence": (st.booleans(), st.booleans()),
        # ResponseOptions
        "return_prompt_tokens": (st.booleans(), st.booleans()),
        "logprobs": (st.booleans(), st.booleans()),
        "top_logprobs": (st.integers(0, 20), uint32(20)),
        # GenerateRequest / ChatRequest
        "truncate_prompt_tokens": (st.sampled_from((0, 0, 8, 64)), uint32(64, 512, 513)),
        "priority": (st.integers(-3, 3), st.one_of(_edges(I32, -I32 - 1), ints)),
        "request_id": (st.one_of(st.just(""), st.just("dup"), st.text(max_size=20)),
                       st.one_of(text(40), st.just("r" * 128), st.just("r" * 129))),
        "prompt": (PROMPTS, st.one_of(text(), HUGE)),
        "n": (st.integers(0, 3), uint32(16, 17)),
        "logit_bias": (st.dictionaries(st.integers(0, 319), _unit(-100, 100), max_size=3),
                       st.dictionaries(uint32(320, 49151, 49152), FLOATS, max_size=4)),
        "response_format": (GOOD_FORMATS, HOSTILE_FORMATS),
    }


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "seed")
STOPPING = ("max_new_tokens", "min_new_tokens", "stop_sequences", "stop_token_ids",
            "ignore_eos", "time_limit_s", "include_stop_sequence")
OPTIONS = ("return_prompt_tokens", "logprobs", "top_logprobs")


@st.composite
def _values(draw: Any, limit: int, names: tuple[str, ...]) -> dict[str, Any]:
    """Field values for one request: all in range, one hostile field, or many hostile ones
    (so that valid requests, which reach the engine, are common, and every field is tried
    out of range both alone and together with others)."""
    fields = {n: _fields(limit)[n] for n in names}
    mode = draw(st.sampled_from(("clean", "one", "one", "wild")))
    bad = {draw(st.sampled_from(names))} if mode == "one" else set()
    out = {}
    for name, (good, hostile) in fields.items():
        wild = mode == "wild" and draw(st.booleans())
        out[name] = draw(hostile if name in bad or wild else good)
    return out


def _set(msg: Any, values: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if values[n] is None:
            continue
        if isinstance(values[n], list):
            getattr(msg, n).extend(values[n])
        else:
            setattr(msg, n, values[n])
    return msg


def _common(msg: Any, v: dict[str, Any]) -> Any:
    if v.get("n"):
        msg.n = v["n"]
    if v.get("logit_bias"):
        msg.sampling.logit_bias.update(v["logit_bias"])
    rf = v.get("response_format")
    if rf:
        for key, value in rf.items():
            if key == "choice":
                msg.response_format.choice.choices.extend(value)
            else:
                setattr(msg.response_format, key, value)
    _set(msg.sampling, v, SAMPLING)
    _set(msg.stopping, v, STOPPING)
    _set(msg.options, v, OPTIONS)
    return _set(msg, v, ("truncate_prompt_tokens", "priority", "request_id"))


ALL = SAMPLING + STOPPING + OPTIONS + ("truncate_prompt_tokens", "priority", "request_id", "n",
                                       "logit_bias", "response_format")


def generate_requests(limit: int) -> st.SearchStrategy[pb.GenerateRequest]:
    return _values(limit, ALL + ("prompt",)).map(
        lambda v: _common(pb.GenerateRequest(prompt=v["prompt"]), v))


def chat_requests(limit: int) -> st.SearchStrategy[pb.ChatRequest]:
    roles = st.one_of(st.sampled_from(("system", "user", "assistant", "user", "user")),
                      st.sampled_from(("", "tool", "USER")), text(12))
    contents = st.one_of(PROMPTS, PROMPTS, text(), HUGE)
    message = st.builds(pb.ChatMessage, role=roles, content=contents)

    def build(v: dict[str, Any], msgs: list[pb.ChatMessage]) -> pb.ChatRequest:
        return _common(pb.ChatRequest(messages=msgs), v)

    return st.builds(build, _values(limit, ALL), st.lists(message, max_size=4))


def tokenize_requests() -> st.SearchStrategy[pb.TokenizeRequest]:
    return st.builds(pb.TokenizeRequest, text=st.one_of(PROMPTS, text(), HUGE),
                     add_special_tokens=st.booleans())


@dataclass(frozen=True)
class Call:
    """One RPC to make: a method and either a message or raw bytes, with a deadline."""

    method: str
    message: Any = None
    raw: bytes | None = None
    timeout: float = 30.0
    twice: bool = False
    """Send the same message twice at once (duplicate request ids in flight)."""

    def __repr__(self) -> str:  # huge prompts would flood a failure report
        body = repr(self.raw) if self.raw is not None else str(self.message).replace("\n", " ")
        return (f"Call({self.method}, timeout={self.timeout}, twice={self.twice}, "
                f"{body[:600]}{'...' if len(body) > 600 else ''})")


def calls(limit: int) -> st.SearchStrategy[Call]:
    """Any call of the API, well-formed or not."""
    timeouts = st.one_of(st.just(30.0), st.just(30.0), st.sampled_from((0.001, 0.02, 0.2)))
    gen = st.builds(Call, st.sampled_from(("Generate", "GenerateStream")),
                    generate_requests(limit), timeout=timeouts, twice=st.booleans())
    chat = st.builds(Call, st.sampled_from(("Chat", "ChatStream")), chat_requests(limit),
                     timeout=timeouts, twice=st.booleans())
    tok = st.builds(Call, st.just("Tokenize"), tokenize_requests(), timeout=timeouts)
    info = st.builds(Call, st.just("ModelInfo"), st.just(pb.ModelInfoRequest()))
    raw = st.builds(Call, st.sampled_from(METHODS + EXTRA_METHODS), raw=st.one_of(
        st.binary(max_size=64),
        st.sampled_from((b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab",
                         b"\x0a\x02\xc3\x28", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02"))))
    return st.one_of(gen, gen, chat, tok, info, raw)


def _invoke(channel: grpc.Channel, call: Call) -> tuple[grpc.StatusCode, str]:
    path = call.method if call.method.startswith("/") else SERVICE + call.method
    streaming = call.method in STREAMING
    if call.raw is not None:
        ident = lambda b: b  # noqa: E731 - raw bytes on the wire
        fn = (channel.unary_stream if streaming else channel.unary_unary)(
            path, request_serializer=ident, response_deserializer=ident)
        payload = call.raw
    else:
        stub = pb_grpc.TextGenerationStub(channel)
        fn, payload = getattr(stub, call.method), call.message
    try:
        if streaming:
            for _ in fn(payload, timeout=call.timeout):
                pass
        else:
            fn(payload, timeout=call.timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def run_call(channel: grpc.Channel, call: Call) -> list[tuple[grpc.StatusCode, str]]:
    """Make the call (twice at once when asked); (status, detail) per attempt."""
    import concurrent.futures

    if not call.twice:
        return [_invoke(channel, call)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: _invoke(channel, call), range(2)))
