"""Hostile input through a real server: the whole request space, and damaged model weights.

A real `shardserve serve` (tiny Llama, one real worker-group process) takes requests drawn by
hypothesis over every field of every RPC (loadtest/hostile_requests.py), malformed protobuf
bytes on every method, duplicate ids in flight and short deadlines. Every call must end OK or
with a documented status, never INTERNAL or UNKNOWN; the worker group must never restart (same
pids, restart counter at 0); and a greedy request returns afterwards exactly what it returned
before. loadtest/fuzz_server.py runs the same with thousands of examples.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import hostile_requests as hr  # noqa: E402
from grpc_servers import RunningServer  # noqa: E402

LIMIT = 24  # --max-new-tokens-limit: keeps every drawn generation short


@pytest.fixture(scope="module")
def server(tiny_llama_untied_dir):
    s = RunningServer(tiny_llama_untied_dir, "--max-new-tokens-limit", str(LIMIT),
                      "--max-queued-requests", "64", "--kv-cache-tokens", "4096",
                      "--max-batch-size", "8", "--dtype", "bf16")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.target, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    yield ch
    ch.close()


def _greedy(server) -> list[int]:
    with server.client() as c:
        return c.generate("the quick brown fox", max_new_tokens=12, temperature=0.0,
                          ignore_eos=True).token_ids


def test_min_new_tokens_does_not_crash_the_group(server):
    """The reported crash: min_new_tokens masks EOS in the logits of a batch where every row
    samples (an in-place write to the forward's inference tensor killed the worker)."""
    pids = server.children()
    with server.client() as c:
        r = c.generate("Hello there", max_new_tokens=8, min_new_tokens=2)
        assert len(r.token_ids) >= 2
        r = c.generate("Hello there", max_new_tokens=8, min_new_tokens=8, temperature=0.0)
        assert len(r.token_ids) == 8
    assert server.children() == pids


def test_malformed_protobuf_is_invalid_argument_with_one_line(server, channel):
    n = len(server.log)
    for method in hr.METHODS:
        [(status, detail)] = hr.run_call(channel, hr.Call(method, raw=b"\xff\xff\xff\xff"))
        assert status is grpc.StatusCode.INVALID_ARGUMENT, (method, status, detail)
        assert detail == f"malformed request: not a valid protobuf message for {method}"
    new = "".join(server.log[n:])
    assert "Traceback" not in new
    assert new.count("malformed request to") == 1, new  # rate-limited to one line


@settings(max_examples=250, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(call=hr.calls(LIMIT))
def _drive(call, channel, seen):
    for status, detail in hr.run_call(channel, call):
        seen.append(status)
        assert status in hr.ALLOWED, f"{call.method} -> {status.name}: {detail}\n{call!r}"[:2000]


def test_whole_request_space(server, channel):
    before, pids = _greedy(server), server.children()
    seen: list[grpc.StatusCode] = []
    t0 = time.monotonic()
    _drive(channel=channel, seen=seen)
    assert len(seen) >= 250
    logged = sum("malformed request to" in line for line in server.log)
    assert logged <= 2 + (time.monotonic() - t0) / 10  # one line per 10 s at most
    assert server.children() == pids, "the worker group restarted"
    assert server.metric("shardserve_worker_group_restarts_total") == 0
    assert _greedy(server) == before
    codes = {s.name for s in seen}
    # the draw reached the interesting outcomes, not only one of them
    assert {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED"} <= codes, codes


def test_seed_takes_the_whole_uint64_range(server):
    with server.client() as c:
        a = c.generate("hello", max_new_tokens=6, temperature=1.0, seed=2**64 - 1)
        b = c.generate("hello", max_new_tokens=6, temperature=1.0, seed=2**64 - 1)
    assert a.token_ids == b.token_ids


@pytest.fixture(scope="module")
def nan_model(tiny_llama_untied_dir, tmp_path_factory):
    """The tiny model with NaN in one layer's weights (a valid checkpoint, sha256 and all)."""
    import torch

    from shardserve_sharding.checkpoint.io import load_full_state_dict, write_checkpoint
    from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
    from shardserve_sharding.tokenizer import TokenizerBundle

    manifest, state = load_full_state_dict(tiny_llama_untied_dir)
    state["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")
    dst = tmp_path_factory.mktemp("nan") / "llama-nan"
    specs = [TensorSpec(n, torch.float32, tuple(t.shape)) for n, t in state.items()]
    tok = TokenizerBundle.load(tiny_llama_untied_dir / "tokenizer")
    write_checkpoint(dst, family=manifest.family, config=manifest.config,
                     tensors=state.items(), specs=specs, tokenizer=tok,
                     source={"format": "test-nan"})
    return dst


def test_non_finite_logits_end_the_request_with_an_error(nan_model):
    from shardserve_client import FinishReason, ShardserveError

    s = RunningServer(nan_model, "--dtype", "fp32", "--http-port", "0")
    try:
        pids = s.children()
        with s.client() as c:
            chunks = list(c.generate_stream("hello", max_new_tokens=4))
            assert chunks[-1].finish_reason is FinishReason.ERROR
            assert "non-finite logits" in chunks[-1].error
            with pytest.raises(ShardserveError) as e:
                c.generate("hello", max_new_tokens=4)
            assert e.value.code is grpc.StatusCode.INTERNAL and "non-finite logits" in str(e.value)
            assert c.model_info().family == "llama"  # still serving
        # the HTTP API: 500 in OpenAI's error shape (unary), an error event (stream)
        import openai

        with openai.OpenAI(base_url=s.http_url + "/v1", api_key="x", max_retries=0) as oc:
            with pytest.raises(openai.InternalServerError) as he:
                oc.completions.create(model=nan_model.name, prompt="hello", max_tokens=4)
            assert "non-finite logits" in he.value.body["message"]
            with pytest.raises(openai.APIError, match="non-finite logits"):
                list(oc.completions.create(model=nan_model.name, prompt="hello",
                                           max_tokens=4, stream=True))
        assert s.children() == pids
        lines = [json.loads(x.split(" ", 4)[-1]) for x in s.log if '"event": "request"' in x]
        assert any(r["outcome"] == "error" for r in lines)
    finally:
        assert s.stop() == 0
