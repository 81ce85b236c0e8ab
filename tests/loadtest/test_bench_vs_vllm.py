"""The peer benchmark's own parts, without vLLM (which is never installed in CI): SSE framing
split anywhere, token counts from OpenAI-style chunks with and without usage, window
statistics on hand-made timelines, distinct prompts, and the SSE client and window loop
against a real aiohttp server on loopback that streams as vLLM does (a stand-in: vLLM itself
cannot run here)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import bench_vs_vllm as bench  # noqa: E402
from stream_stats import (  # noqa: E402
    Request,
    SSEParser,
    TokenCounter,
    parse_event,
    percentile,
    window_stats,
)

STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"choices":[{"text":"Hel"}],"usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n'
    b'data: {"choices":[{"text":"lo"}],"usage":{"prompt_tokens":7,"completion_tokens":3}}\r\n\r\n'
    b'event: message\ndata: {"choices":[{"text":"!",\ndata: "finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":4}}\r\r'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64, len(STREAM)])
def test_sse_parser_any_split(split):
    parser = SSEParser()
    events = []
    for i in range(0, len(STREAM), split):
        events += parser.feed(STREAM[i:i + split])
    assert len(events) == 4 and events[-1] == "[DONE]"
    objs = [parse_event(e) for e in events]
    assert objs[-1] is None
    assert objs[2]["choices"][0]["finish_reason"] == "length"  # two data lines joined
    counter = TokenCounter()
    assert [counter.tokens(o) for o in objs[:-1]] == [1, 2, 1]
    assert counter.prompt_tokens == 7 and counter.finish_reason == "length"


def test_token_counter_without_continuous_usage():
    """Our HTTP API: text chunks count one each, the final usage chunk makes the total exact
    (a token held back for an incomplete character arrives there)."""
    c = TokenCounter()
    assert c.tokens({"choices": [{"text": "a"}]}) == 1
    assert c.tokens({"choices": [{"text": ""}]}) == 0
    assert c.tokens({"choices": [{"text": "b", "finish_reason": "length"}]}) == 1
    assert c.tokens({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}) == 1
    assert c.counted == 3
    with pytest.raises(RuntimeError, match="server error"):
        c.tokens({"error": {"message": "boom"}})


def test_percentile_interpolates():
    assert percentile([3, 1, 2], 0.5) == 2
    assert percentile([0, 10], 0.99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 0.5))


def test_window_stats_counts_only_after_the_skip():
    # window [0, 10], skip 20%: counted part [2, 10]
    a = Request(sent=0.5, arrivals=[(1.0, 1), (1.5, 1), (2.5, 1), (3.0, 2)], done=True)
    b = Request(sent=3.0, arrivals=[(3.4, 1), (3.6, 1), (3.8, 1), (4.0, 1)], done=True)
    c = Request(sent=9.5, arrivals=[], done=False)  # cancelled before its first token
    st = window_stats([a, b, c], 0.0, 10.0, 0.2, new_tokens=4)
    assert st.counted_s == pytest.approx(8.0)
    assert st.tok_s == pytest.approx((1 + 2 + 4) / 8.0)
    assert st.n_ttft == 1 and st.ttft_p50 == pytest.approx(0.4)  # only b was sent after 2 s
    # gaps with both ends counted: a 2.5->3.0 over 2 tokens (0.25 x2), b 0.2 x3
    assert st.itl_p50 == pytest.approx(0.2)
    assert st.completed == 2 and st.wrong_length == 1  # a got 5 tokens, not 4


def test_prompts_are_distinct_and_about_100_tokens():
    from shardserve_sharding.tokenizer import train_bpe

    tok = train_bpe([" ".join(bench.WORDS)] * 5 + ["Request 0123456789:"], vocab_size=400)
    prompts = bench.make_prompts(tok, 50)
    assert len(set(prompts)) == 50
    assert len({p[:12] for p in prompts}) == 50  # they differ from the first token on
    lens = [len(tok.encode(p)) for p in prompts]
    assert all(95 <= n <= 105 for n in lens), lens


async def _vllm_like_server(tokens: int, delay: float):
    """A real HTTP server on loopback that streams /v1/completions as vLLM does."""
    from aiohttp import web

    seen = []

    async def completions(request):
        body = await request.json()
        seen.append(body)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(1, body["max_tokens"] + 1):
            await asyncio.sleep(delay)
            chunk = {"choices": [{"text": f"t{i}", "finish_reason":
                                  "length" if i == tokens else None}],
                     "usage": {"prompt_tokens": 9, "completion_tokens": i}}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1/completions", seen


def test_sse_client_and_window_against_a_streaming_server():
    async def main():
        runner, url, seen = await _vllm_like_server(bench.NEW_TOKENS, 0.005)
        try:
            send, close = await bench.http_target(url)()
            try:
                reqs, t0, t1, used = await bench.run_window(send, [f"p{i}" for i in range(99)],
                                                            0, 3, 1.5)
            finally:
                await close()
        finally:
            await runner.cleanup()
        return reqs, t0, t1, used, seen

    reqs, t0, t1, used, seen = asyncio.run(main())
    assert t1 - t0 == pytest.approx(1.5, abs=0.3)  # running requests were cancelled
    assert used == len(reqs) >= 3
    assert [b["prompt"] for b in seen] == [f"p{i}" for i in range(len(seen))]  # all distinct
    body = seen[0]
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"] is True
    assert body["max_tokens"] == bench.NEW_TOKENS
    finished = [r for r in reqs if r.done]
    assert finished and all(r.tokens == bench.NEW_TOKENS for r in finished)
    assert all(r.prompt_tokens == 9 for r in finished)
    assert any(not r.done for r in reqs)  # the three in flight at the end
    st = window_stats(reqs, t0, t1, 0.2, bench.NEW_TOKENS)
    assert st.wrong_length == 0 and st.completed >= 1 and st.tok_s > 0
    assert 0.004 <= st.itl_p50 <= 0.05


def _record(repeat, target, streams, tok_s, ttft, load=1.0):
    from stream_stats import WindowStats

    st = WindowStats(tok_s=tok_s, ttft_p50=ttft, ttft_p99=2 * ttft, itl_p50=0.05, n_ttft=10,
                     completed=10, wrong_length=0, counted_s=36.0)
    return bench.RunRecord(repeat, target, streams, st, load, 100.0)


def test_report_lists_every_run_ratios_and_targets():
    import argparse

    args = argparse.Namespace(streams=[1, 32], seconds=45.0, repeats=2, warmup_seconds=10.0,
                              vllm_bind="0-1", vllm_kv_gib=4.0, vllm_args="",
                              shardserve_args="", note="a note", model_label="tiny")
    records = [_record(r, t, s, tok, ttft, load)
               for r, load in ((0, 1.0), (1, 9.0))
               for t, s, tok, ttft in (("vLLM", 1, 40.0, 0.1), ("vLLM", 32, 400.0, 0.5),
                                       ("shardserve gRPC", 1, 60.0, 0.08),
                                       ("shardserve gRPC", 32, 440.0, 0.6))]
    text = "\n".join(bench.report(records, args, "CMD", {"peer": "vLLM x"}, 60.0))
    assert "Command: `CMD`" in text and "**a note**" in text and "CPU flags:" in text
    assert "| shardserve gRPC | 32 | 440.0 | 600 | 1200 | 50.0 | 1.10x | 1.20x |" in text
    assert "32 stream(s): tok/s 1.10x vLLM (target >= 1.2x: **missed**)" in text
    assert "1 stream(s): tok/s 1.50x vLLM (target >= 1.2x: met)" in text
    assert text.count("| 2 | vLLM |") == 2 and text.count("| 1 | shardserve gRPC |") == 2
    assert "windows saw a load average above" in text  # the busy repeat is flagged
    alone = [r for r in records if r.target != "vLLM"]
    text = "\n".join(bench.report(alone, args, "CMD", {}, 60.0))
    assert "(vLLM not run: no ratios)" in text and "| - | - |" in text


def test_report_gives_http_over_grpc_per_stream_count():
    import argparse

    args = argparse.Namespace(streams=[1, 32], seconds=45.0, repeats=1, warmup_seconds=10.0,
                              vllm_bind="0-1", vllm_kv_gib=4.0, vllm_args="",
                              shardserve_args="", note="", model_label="tiny")
    records = [_record(0, t, s, tok, ttft)
               for t, s, tok, ttft in (("shardserve gRPC", 1, 60.0, 0.08),
                                       ("shardserve gRPC", 32, 400.0, 0.6),
                                       ("shardserve HTTP", 1, 59.0, 0.09),
                                       ("shardserve HTTP", 32, 360.0, 0.7))]
    text = "\n".join(bench.report(records, args, "CMD", {}, 60.0))
    assert "- 1 stream(s): tok/s 0.983x gRPC (target >= 0.95x: met); TTFT p50 90 ms vs 80 ms" \
        in text
    assert "- 32 stream(s): tok/s 0.900x gRPC (target >= 0.95x: **missed**)" in text
    text = "\n".join(bench.report(records[:2], args, "CMD", {}, 60.0))
    assert "(shardserve HTTP not run: no HTTP vs gRPC ratio)" in text
