"""The OpenAI-compatible HTTP API through a real `shardserve serve --http-port` and the official
`openai` SDK (sync, async, streaming), plus raw sockets for what the SDK cannot send.

One server for the module (tiny untied Llama, bearer token on, a small queue so that 429 is
reachable): greedy output equals the gRPC API's, chat applies the template, usage counts,
every documented error status (400, 401, 404, 413, 429, 503, 504), hostile bodies (never 500,
the worker group never restarts), a hypothesis property test over request bodies, and, last,
a killed worker group (503 in the stream, ready again after the restart) and, last, the
drain (503 while draining, the in-flight stream finishes, exit code 0).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sys
import threading
import urllib.parse
from pathlib import Path

import jsonschema
import openai
import pytest
from grpc_servers import SLOW_DEADLINE_S, SLOW_STEPS, RunningServer, poll
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOKEN = "s3cret-token"
MODEL = "tiny"
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_llama_untied_dir, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("http-auth") / "token"
    token_file.write_text(TOKEN + "\n")
    s = RunningServer(tiny_llama_untied_dir, "--dtype", "fp32", "--http-port", "0",
                      "--served-model-name", MODEL, "--auth-token-file", str(token_file),
                      "--max-batch-size", "2", "--max-queued-requests", "2",
                      "--kv-cache-tokens", "2048", "--block-size", "8", token=TOKEN,
                      prefix=SLOW_STEPS)  # the drain test's stream still runs when it looks
    assert s.http_url and s.http_url.startswith("http://127.0.0.1:")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in "".join(s.log), "".join(s.log)[-3000:]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key=TOKEN, max_retries=0,
                       timeout=60) as c:
        yield c


def raw(server, method: str, path: str, body: bytes | str | None = None,
        headers: dict | None = None, token: str | None = TOKEN) -> tuple[int, dict | str]:
    """One request over a plain socket: (status, parsed JSON body or text)."""
    u = urllib.parse.urlsplit(server.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def error_of(body) -> dict:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err



def test_completions_equal_grpc_sync_and_streaming(server, client):
    with server.client() as c:
        ref = c.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True,
                         logprobs=True, top_logprobs=2)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert ch.text == ref.text and ch.finish_reason == "length"
    assert r.usage.prompt_tokens == ref.prompt_token_count
    assert r.usage.completion_tokens == 12 == len(ch.logprobs.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert ch.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert all(len(t) <= 2 for t in ch.logprobs.top_logprobs)
    assert r.model == MODEL and r.id.startswith("cmpl-")

    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == ref.prompt_token_count

    # a prompt of token ids (vLLM's form) is the same request; streamed logprobs per token
    with server.client() as c:
        ids = c.tokenize(PROMPT, add_special_tokens=True)
    chunks = list(client.completions.create(
        model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True, logprobs=1,
        extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    lps = [lp for c in chunks if c.choices[0].logprobs
           for lp in c.choices[0].logprobs.token_logprobs]
    assert lps == pytest.approx(ref.logprobs, abs=1e-5)


def test_prefix_cache_hits_are_reported_by_both_apis(server, client):
    """A prompt of several KV blocks (block size 8 here) sent again is served from the prefix
    cache: the same greedy text, and the cached prompt tokens in the gRPC response (unary and
    stream) and in OpenAI usage.prompt_tokens_details (unary and streamed usage)."""
    prompt = " ".join(["shared system prompt words"] * 12) + " and then"
    with server.client() as c:
        first = c.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True)
        again = c.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True)
        last = list(c.generate_stream(prompt, max_new_tokens=6, temperature=0,
                                      ignore_eos=True))[-1]
    n = first.prompt_token_count
    assert n >= 24
    assert again.text == first.text
    # every full block but the one holding the last prompt token (its logits are needed)
    assert again.cached_prompt_token_count == (n - 1) // 8 * 8 > 0
    assert last.cached_prompt_token_count == again.cached_prompt_token_count
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == first.text
    assert r.usage.prompt_tokens_details.cached_tokens == again.cached_prompt_token_count
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    # four requests found the prefix cached (the front end reads the group's stats each step)
    assert poll(lambda: server.metric("shardserve_prefix_cache_hits_total") >= 4 * cached)


def test_chat_applies_the_template_async_and_streaming(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with server.client() as c:
        ref = c.chat(messages, max_new_tokens=10, temperature=0, ignore_eos=True)
        plain = c.generate("be brief hello", max_new_tokens=1)

    async def go():
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=TOKEN,
                                      max_retries=0, timeout=60) as ac:
            r = await ac.chat.completions.create(
                model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
            stream = await ac.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            return r, chunks

    r, chunks = asyncio.run(go())
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.id.startswith("chatcmpl-")
    # the template wraps the messages: more prompt tokens than the bare text, as gRPC's Chat
    assert r.usage.prompt_tokens == ref.prompt_token_count > plain.prompt_token_count
    assert r.usage.completion_tokens == 10
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ref.text
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.total_tokens == ref.prompt_token_count + 10


def test_stop_sequences_and_vllm_extensions(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    assert stop
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, presence_penalty=0.5,
        frequency_penalty=0.5, user="u1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 6,
                    "ignore_eos": False})
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, presence_penalty=0.5,
        frequency_penalty=0.5, user="u1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 6,
                    "ignore_eos": False})
    assert r.usage.completion_tokens == 6 and r.choices[0].text == again.choices[0].text


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "kind": {"enum": ["beach", "city", "hike"]},
    "ok": {"type": "boolean"}},
    "required": ["city", "days", "kind", "ok"], "additionalProperties": False}


def test_n_structured_output_logit_bias_and_stop_reason(client):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 3,
          "extra_body": {"ignore_eos": True}}
    r = client.completions.create(n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    assert r.choices[0].text == client.completions.create(**kw).choices[0].text  # seed + 0
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {0: r.choices[0].text, 1: r.choices[1].text}

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "plan a trip"}], n=2,
        max_tokens=60, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
    for c in chat.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"
    pick = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                     extra_body={"structured_outputs": {"choice": ["a b", "c"]}})
    assert pick.choices[0].text in ("a b", "c")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], response_format={
                "type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "no"}}})
    assert e.value.body["param"] == "response_format"

    biased = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                       logprobs=0, logit_bias={"7": 100},
                                       extra_body={"ignore_eos": True})
    assert len(set(biased.choices[0].logprobs.tokens)) == 1

    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    stop = free.text[2:5]
    assert stop and free.model_extra["stop_reason"] is None
    hit = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert hit.finish_reason == "stop" and hit.model_extra["stop_reason"] == stop
    last = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10,
                                          temperature=0, stop=[stop], stream=True,
                                          extra_body={"ignore_eos": True}))[-1].choices[0]
    assert last.model_extra["stop_reason"] == stop


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert raw(server, "GET", "/health", token=None) == (200, {"status": "ok"})
    assert raw(server, "GET", "/ready", token=None) == (200, {"status": "ready"})


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 17}, "n"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"min_tokens": 9}, "max_tokens": 4}, "min_tokens"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
])
def test_400_names_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and param in e.value.body["message"]


def test_401_404_413_and_shapes(server, client):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    status, body = raw(server, "POST", "/v1/completions", "{}", token=None)
    assert status == 401 and error_of(body)["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    status, body = raw(server, "GET", "/v1/nothing")
    assert status == 404 and error_of(body)
    status, body = raw(server, "GET", "/v1/completions")
    assert status == 405 and error_of(body)
    big = json.dumps({"model": MODEL, "prompt": "a" * (10 << 20)})
    status, body = raw(server, "POST", "/v1/completions", big)
    assert status == 413 and error_of(body)["code"] == "request_too_large"


def test_429_when_the_queue_is_full(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=TOKEN,
                                      max_retries=0, timeout=60) as ac:
            async def one():
                try:
                    # 100 slow steps (>= 1 s): the first two still run when the last arrive
                    await ac.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100,
                                                extra_body={"ignore_eos": True})
                    return 200
                except openai.RateLimitError as e:
                    assert e.body["code"] == "queue_full"
                    return 429
            # 2 running + 4 handed ahead to the group + 2 waiting fit; the rest is refused
            return await asyncio.gather(*(one() for _ in range(12)))

    codes = asyncio.run(go())
    assert 429 in codes and 200 in codes
    assert poll(lambda: server.metric("shardserve_requests_total",
                                      'method="/v1/completions",outcome="overloaded"') >= 1)


def test_504_deadline_and_disconnects_free_the_cache(server, client):
    with pytest.raises(openai.APIStatusError) as e:  # slow steps: 400 tokens take 4 s or more
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400,
                                  extra_body={"ignore_eos": True},
                                  extra_headers={"X-Request-Timeout": str(SLOW_DEADLINE_S)})
    assert e.value.status_code == 504 and e.value.body["code"] == "deadline_exceeded"
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client goes away mid-stream
    # a unary request whose client gives up
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key=TOKEN, max_retries=0,
                       timeout=SLOW_DEADLINE_S) as impatient, pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400,
                                     extra_body={"ignore_eos": True})
    assert poll(lambda: server.metric("shardserve_kv_cache_usage_ratio") == 0.0)
    assert poll(lambda: server.metric("shardserve_running_requests") == 0.0)
    labels = 'method="/v1/completions",outcome='
    assert server.metric("shardserve_requests_total", labels + '"deadline"') >= 1
    assert poll(lambda: server.metric("shardserve_requests_total", labels + '"cancelled"') >= 2)


def test_metrics_count_http_requests(server, client):
    key = 'method="/v1/chat/completions",outcome="ok"'
    before = server.metric("shardserve_requests_total", key)
    tokens = server.metric("shardserve_generated_tokens_total")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=5, extra_body={"ignore_eos": True})
    assert poll(lambda: server.metric("shardserve_requests_total", key) == before + 1)
    assert server.metric("shardserve_generated_tokens_total") >= tokens + 5


def test_the_vllm_benchmark_harness_drives_us_over_http(server, monkeypatch):
    """loadtest/bench_vs_vllm.py's SSE client (the one it points at vLLM) and window loop."""
    import aiohttp

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
    import bench_vs_vllm as bench
    from stream_stats import window_stats

    monkeypatch.setattr(bench, "MODEL_NAME", MODEL)
    assert bench.shardserve_has_http()

    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
            send = bench.sse_client(s, server.http_url + "/v1/completions")
            # 5 s: a 64-token request takes up to ~2 s on 2 cores shared with other work
            return await bench.run_window(send, [f"{PROMPT} {i}" for i in range(50)], 0, 2,
                                          5.0)

    reqs, t0, t1, _ = asyncio.run(main())
    finished = [r for r in reqs if r.done]
    assert finished and all(r.tokens == bench.NEW_TOKENS for r in finished)
    assert all(r.prompt_tokens and r.prompt_tokens > 3 for r in finished)
    st = window_stats(reqs, t0, t1, 0.0, bench.NEW_TOKENS)
    assert st.wrong_length == 0 and st.tok_s > 0


BAD_BODIES = [
    ("not json", None),
    ("{\"prompt\": \"x\"", None),
    ("[1, 2]", None),
    ("null", None),
    ("\"a string\"", None),
    ("{}", "prompt"),
    ("{\"prompt\": 5}", "prompt"),
    ("{\"prompt\": \"x\", \"max_tokens\": \"5\"}", "max_tokens"),
    ("{\"prompt\": \"x\", \"max_tokens\": 1e400}", "max_tokens"),
    ("{\"prompt\": \"x\", \"max_tokens\": 100000000000000000000000000000}", "max_tokens"),
    ("{\"prompt\": \"x\", \"temperature\": \"hot\"}", "temperature"),
    ("{\"prompt\": \"x\", \"temperature\": NaN}", "temperature"),
    ("{\"prompt\": \"x\", \"temperature\": 1e39}", "temperature"),
    ("{\"prompt\": \"x\", \"seed\": -1}", "seed"),
    ("{\"prompt\": \"x\", \"seed\": 1208925819614629174706176}", "seed"),
    ("{\"prompt\": \"x\", \"stream\": \"yes\"}", "stream"),
    ("{\"prompt\": \"x\", \"stop\": [1]}", "stop"),
    ("{\"prompt\": [999999]}", "prompt"),
    ("{\"prompt\": [[1], [2]]}", "prompt"),
    ("{\"prompt\": []}", "prompt"),
    ("{\"prompt\": \"\"}", "prompt"),
    ("{\"prompt\": \"x\", \"echo\": true}", "echo"),
    ("{\"prompt\": \"x\", \"best_of\": 3}", "best_of"),
    ("{\"prompt\": \"x\", \"stream_options\": []}", "stream_options"),
    ("[" * 100000 + "]" * 100000, None),
    ("{\"prompt\": \"" + "\\ud800" + "\"}", None),
]
BAD_CHAT = [
    ("{}", "messages"),
    ("{\"messages\": []}", "messages"),
    ("{\"messages\": [{\"content\": \"x\"}]}", "messages[0].role"),
    ("{\"messages\": [{\"role\": \"\", \"content\": \"x\"}]}", "messages[0].role"),
    ("{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "messages[0].content"),
    ("{\"messages\": \"hi\"}", "messages"),
    ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{}]}", "tools"),
    ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 2}",
     "top_logprobs"),
    ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_completion_tokens\": 0}",
     "max_completion_tokens"),
]


def test_bad_bodies_are_400_never_500(server):
    pids = server.children()
    for path, cases in (("/v1/completions", BAD_BODIES), ("/v1/chat/completions", BAD_CHAT)):
        for body, param in cases:
            status, reply = raw(server, "POST", path, body.encode("utf-8", "surrogatepass"))
            assert status == 400, (path, body[:80], status, reply)
            err = error_of(reply)
            if param is not None:
                assert err["param"] == param, (body[:80], err)
    status, reply = raw(server, "POST", "/v1/completions", b"\xff\xfe{}")
    assert status == 400 and error_of(reply)
    status, _ = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x"}),
                    headers={"X-Request-Timeout": "soon"})
    assert status == 400
    n = len(server.log)
    u = urllib.parse.urlsplit(server.http_url)
    for _ in range(3):  # not HTTP at all: uvicorn's 400, one log line for the three
        with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
            sock.sendall(b"GARBAGE \x00\xff\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert poll(lambda: "Invalid HTTP request" in "".join(server.log[n:]), 5)
    assert "".join(server.log[n:]).count("Invalid HTTP request") == 1
    status, reply = raw(server, "POST", "/v1/completions",
                        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2,
                                    "ignore_eos": True}))  # sampled: EOS may come first
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert server.children() == pids


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.integers(0, 40), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "user", "n",
          "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens",
          "ignore_eos", "stop_token_ids", "truncate_prompt_tokens", "priority", "messages",
          "max_completion_tokens", "echo", "logit_bias", "include_stop_str_in_output",
          "response_format", "structured_outputs"]
SMALL = st.integers(1, 24)


@st.composite
def bodies(draw):
    chat = draw(st.booleans())
    body: dict = {"messages": [{"role": "user", "content": draw(st.text(max_size=20))}]} \
        if chat else {"prompt": draw(st.text(max_size=20))}
    body["max_tokens"] = draw(SMALL)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        body[key] = draw(st.one_of(JSON, SMALL) if key.startswith("max") else JSON)
    if draw(st.booleans()) and isinstance(body.get("max_tokens"), int) \
            and body["max_tokens"] > 24:
        body["max_tokens"] = 24  # keep drawn generations short
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


DOCUMENTED = {200, 400, 404, 429}


def test_property_bodies_through_the_real_server(server):
    pids = server.children()
    statuses: dict[int, int] = {}

    @settings(max_examples=100, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def drive(case):
        path, body = case
        status, reply = raw(server, "POST", path, json.dumps(body, allow_nan=True))
        statuses[status] = statuses.get(status, 0) + 1
        assert status in DOCUMENTED, (body, status, reply)
        if status == 200 and not body.get("stream"):
            assert reply["object"] in ("text_completion", "chat.completion")
        elif status == 200:
            assert reply.rstrip().endswith("data: [DONE]"), reply[-200:]
        else:
            error_of(reply)

    drive()
    assert statuses.get(200) and statuses.get(400), statuses
    assert server.children() == pids
    assert server.metric("shardserve_worker_group_restarts_total") == 0


def test_a_dead_worker_group_is_503_and_ready_comes_back(server, client):
    """After the property test (which asserts no restart): kill the group mid-stream."""
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    os.kill(max(server.children()), signal.SIGKILL)
    with pytest.raises(openai.APIError) as e:
        for _ in it:
            pass
    assert e.value.body["code"] == "unavailable"  # the stream's error event: 503's
    assert poll(lambda: raw(server, "GET", "/ready", token=None)[0] == 200, 60)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_drain_answers_503_and_finishes_in_flight(server, client):
    """Last: SIGTERM drains this module's server."""
    got: list[str] = []

    def read():
        for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400,
                                           stream=True, extra_body={"ignore_eos": True}):
            got.extend(ch.finish_reason or "" for ch in c.choices)

    t = threading.Thread(target=read)
    t.start()
    assert poll(lambda: server.metric("shardserve_running_requests") >= 1)
    server.proc.send_signal(signal.SIGTERM)
    assert poll(lambda: raw(server, "GET", "/ready", token=None)[0] == 503)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503
    t.join(60)
    assert "length" in got  # the in-flight stream ran to its end
    assert server.proc.wait(60) == 0
