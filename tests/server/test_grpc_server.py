"""The real gRPC server in a subprocess: outputs, validation, overload, deadlines, cancel,
health, reflection, auth, TLS, metrics (also scraped by a real Prometheus), drain."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
from grpc_servers import SLOW_DEADLINE_S, SLOW_STEPS, RunningServer, free_port, poll

from shardserve_client import (
    READINESS,
    DeadlineExceeded,
    FinishReason,
    InvalidArgument,
    Overloaded,
    Unauthenticated,
)
from shardserve_server.engine.local import LocalEngine
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams
from shardserve_sharding.checkpoint.io import load_model


def local_greedy(model_dir, prompt, n):
    m = load_model(model_dir)
    ids = m.tokenizer.encode(prompt)
    r = LocalEngine(m.model, m.tokenizer).generate([GenerationRequest(
        tuple(ids), SamplingParams(temperature=0.0), StoppingParams(n, ignore_eos=True), "x")])
    return r[0]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    s = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--max-batch-size", "4",
                      "--kv-cache-tokens", "2048", "--block-size", "8",
                      prefix=SLOW_STEPS)  # deadlines and cancels land mid-request
    yield s
    assert s.stop() == 0



def test_outputs_match_local_engine_and_stream(server, tiny_llama_dir):
    ref = local_greedy(tiny_llama_dir, "the quick brown fox", 12)
    with server.client() as c:
        r = c.generate("the quick brown fox", max_new_tokens=12, temperature=0, ignore_eos=True,
                       logprobs=True, top_logprobs=2, return_prompt_tokens=True)
        assert r.token_ids == ref.token_ids and r.text == ref.text
        assert r.finish_reason is FinishReason.MAX_TOKENS and len(r.logprobs) == 12
        assert r.prompt_token_count == len(r.prompt_tokens) > 0
        chunks = list(c.generate_stream("the quick brown fox", max_new_tokens=12, temperature=0,
                                        ignore_eos=True))
        assert "".join(ch.text for ch in chunks) == r.text
        assert chunks[-1].finish_reason is FinishReason.MAX_TOKENS
        assert c.tokenize("hello world") == load_model(tiny_llama_dir).tokenizer.encode(
            "hello world", add_special_tokens=False)
        info = c.model_info()
        assert info.family == "llama" and info.tensor_parallel == 1 and info.config["n_layers"]
        assert c.health() and c.health(READINESS)


@pytest.mark.parametrize("params,field", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**6}, "max_new_tokens"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"stop_sequences": ["x"] * 17}, "stop_sequences"),
    ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
    ({"n": 17}, "n"),
    ({"logit_bias": {100000: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: 200.0}}, "logit_bias"),
    ({"response_format": {"regex": "("}}, "response_format.regex"),
    ({"response_format": {"json_schema": "{"}}, "response_format.json_schema"),
    ({"response_format": {"json_schema": '{"type": "nope"}'}}, "response_format.json_schema"),
    ({"response_format": {"choice": []}}, "response_format.choice"),
])
def test_validation_names_the_field(server, params, field):
    with server.client() as c, pytest.raises(InvalidArgument, match=field) as e:
        c.generate("hello", **params)
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_prompt_limits_and_truncation(server):
    with server.client() as c:
        with pytest.raises(InvalidArgument, match="prompt"):
            c.generate("")
        long = "a b c d e f g h " * 60  # > 512 tokens with max_new_tokens
        with pytest.raises(InvalidArgument, match="truncate_prompt_tokens"):
            c.generate(long, max_new_tokens=100)
        r = c.generate(long, max_new_tokens=4, truncate_prompt_tokens=64)
        assert r.prompt_token_count == 64
        with pytest.raises(InvalidArgument, match="messages"):
            c.chat([])
        with pytest.raises(TypeError, match="bogus"):
            c.generate("x", bogus=1)


def test_deadline_and_cancel_free_the_cache(server):
    with server.client() as c:
        with pytest.raises(DeadlineExceeded):
            c.generate("hello", max_new_tokens=400, ignore_eos=True, timeout=SLOW_DEADLINE_S)
        stream = c.generate_stream("hello", max_new_tokens=400, ignore_eos=True)
        next(stream)
        stream.close()  # client cancel mid-stream
        stream = c.generate_stream("hello", max_new_tokens=400, ignore_eos=True, n=3)
        next(stream)
        stream.close()  # cancels all three samples
    assert poll(lambda: server.metric("shardserve_kv_cache_usage_ratio") == 0.0, 15)
    assert poll(lambda: server.metric("shardserve_requests_total", 'outcome="deadline"') >= 1)
    assert poll(lambda: server.metric("shardserve_requests_total", 'outcome="cancelled"') >= 1)


def test_n_samples_structured_output_logit_bias_and_stop_echo(server):
    kw = {"temperature": 1.0, "seed": 7, "max_new_tokens": 8, "ignore_eos": True}
    with server.client() as c:
        one = c.generate("the quick", **kw)
        r = c.generate("the quick", n=3, **kw)
        assert [s.index for s in r.samples] == [0, 1, 2]
        assert r.samples[0].token_ids == r.token_ids == one.token_ids  # seed + 0
        assert len({tuple(s.token_ids) for s in r.samples}) > 1
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        finals = []
        for ch in c.generate_stream("the quick", n=3, **kw):
            got[ch.index] += ch.token_ids
            if ch.finish_reason is not None:
                finals.append(ch.index)
        assert sorted(finals) == [0, 1, 2]
        assert [got[i] for i in range(3)] == [s.token_ids for s in r.samples]

        pattern = "[a-z]{2,6}!"
        fmt = c.generate("hello", n=4, temperature=1.0, seed=1, max_new_tokens=40,
                         response_format={"regex": pattern})
        assert all(re.fullmatch(pattern, s.text) for s in fmt.samples), fmt.samples
        assert all(s.finish_reason is FinishReason.EOS for s in fmt.samples)
        pick = c.generate("hello", temperature=1.0, max_new_tokens=10,
                          response_format={"choice": ["red", "green"]})
        assert pick.text in ("red", "green")

        biased = c.generate("hello", temperature=0.0, max_new_tokens=4, ignore_eos=True,
                            logit_bias={5: 100.0})
        assert biased.token_ids == [5] * 4

        free = c.generate("hello", temperature=0.0, max_new_tokens=10, ignore_eos=True)
        stop_id = free.token_ids[3]
        by_id = c.generate("hello", temperature=0.0, max_new_tokens=10, ignore_eos=True,
                           stop_token_ids=[stop_id])
        assert by_id.stop_reason == stop_id and by_id.finish_reason is FinishReason.STOP_SEQUENCE
        assert free.stop_reason is None


METRICS = [
    "shardserve_requests_total", "shardserve_request_duration_seconds_count",
    "shardserve_request_queue_seconds_count", "shardserve_time_to_first_token_seconds_count",
    "shardserve_time_per_output_token_seconds_count", "shardserve_prompt_tokens_total",
    "shardserve_generated_tokens_total", "shardserve_request_prompt_tokens_count",
    "shardserve_request_generated_tokens_count", "shardserve_batch_size_count",
    "shardserve_batch_tokens_count", "shardserve_step_duration_seconds_count",
    "shardserve_queue_depth", "shardserve_running_requests", "shardserve_kv_cache_usage_ratio",
    "shardserve_worker_group_up", "shardserve_worker_group_restarts_total",
]


def test_metrics_exist_and_move(server):
    before = server.metric("shardserve_generated_tokens_total")
    with server.client() as c:
        c.generate("count to ten", max_new_tokens=5, ignore_eos=True)
    assert poll(lambda: server.metric("shardserve_generated_tokens_total") >= before + 5)
    for name in METRICS:
        server.metric(name)
    assert server.metric("shardserve_worker_group_up") == 1
    assert server.metric("shardserve_step_duration_seconds_count", 'phase="decode"') > 0
    assert server.metric("shardserve_requests_total", 'outcome="ok"') >= 1


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"shardserve.v1.TextGeneration", "grpc.health.v1.Health"} <= names


def test_queue_full_is_resource_exhausted(tiny_llama_dir):
    s = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--max-batch-size", "1",
                      "--max-queued-requests", "1", "--drain-timeout", "1",
                      "--kv-cache-tokens", "448", prefix=SLOW_STEPS)
    try:
        # a request longer than the KV budget (448 < the model's 512) could never run: it is
        # refused at the edge, not accepted and then lost in the worker group
        with s.client() as c:
            with pytest.raises(InvalidArgument, match="max_new_tokens"):
                c.generate("hi", max_new_tokens=460)
            with pytest.raises(InvalidArgument, match="KV budget"):
                c.generate("hi " * 300, max_new_tokens=300)
        results: list = []

        def long_call():
            with s.client() as c:
                try:
                    results.append(c.generate("hi", max_new_tokens=400, ignore_eos=True,
                                              timeout=15))
                except Exception as e:  # noqa: BLE001 - collected for the assertion
                    results.append(e)

        # 1 running + 4 handed to the group (lookahead) + 1 waiting = full
        threads = [threading.Thread(target=long_call) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        # all six in: a queue of one (the gauge moves every 0.25 s; slow steps hold it >= 4 s)
        assert poll(lambda: s.metric("shardserve_queue_depth") >= 1, 20)
        with s.client() as c:
            t0 = time.monotonic()
            with pytest.raises(Overloaded, match="queue full"):
                c.generate("hi", max_new_tokens=4)
            assert time.monotonic() - t0 < 2  # answered at once, not queued
            t0 = time.monotonic()
            for _ in range(20):  # a flood: each counted, logged one line a second at most
                with pytest.raises(Overloaded):
                    c.generate("hi", max_new_tokens=4)
            elapsed = time.monotonic() - t0
        assert poll(lambda: s.metric("shardserve_requests_total", 'outcome="overloaded"') == 21)
        lines = [ln for ln in s.log if '"outcome": "overloaded"' in ln]
        assert 1 <= len(lines) <= 2 + elapsed, lines
    finally:
        assert s.stop() == 0


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_and_token_auth(tiny_llama_dir, tmp_path):
    cert, key = _self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    s = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--tls-cert", str(cert), "--tls-key",
                      str(key), "--auth-token-file", str(token_file), "--http-port", "0",
                      token="s3cret-token", tls_ca=cert)
    try:
        # the HTTP API (api/http) serves HTTPS with the same certificate and token
        assert s.http_url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(s.http_url + "/v1/models",
                                     headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == tiny_llama_dir.name
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(s.http_url + "/v1/models", context=ctx, timeout=30)
        assert e.value.code == 401
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(s.http_url.replace("https", "http") + "/health", timeout=5)
        with s.client() as c:
            assert c.generate("hi", max_new_tokens=3, ignore_eos=True).generated_token_count == 3
        with s.client(token="wrong") as c:
            with pytest.raises(Unauthenticated):
                c.generate("hi", max_new_tokens=3)
            with pytest.raises(Unauthenticated):
                list(c.generate_stream("hi", max_new_tokens=3))
            assert c.health()  # health stays open
        with grpc.insecure_channel(s.target) as ch:  # plaintext to a TLS port fails
            with pytest.raises((grpc.RpcError, grpc.FutureTimeoutError)):
                grpc.channel_ready_future(ch).result(timeout=2)
    finally:
        assert s.stop() == 0


@pytest.mark.slow
def test_readiness_tracks_a_hung_and_a_killed_group(tiny_llama_dir):
    s = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--pg-timeout", "5")
    try:
        with s.client() as c:
            worker = s.children()
            assert worker
            def doomed():  # fails when the group is torn down; the outcome is not the point
                try:
                    c.generate("hi", max_new_tokens=400, ignore_eos=True)
                except Exception:  # noqa: BLE001
                    pass

            t = threading.Thread(target=doomed, daemon=True)
            pid = max(worker)
            os.kill(pid, signal.SIGSTOP)
            t.start()
            assert poll(lambda: not c.health(READINESS), 30)
            os.kill(pid, signal.SIGKILL)
            assert poll(lambda: s.metric("shardserve_worker_group_restarts_total") >= 1, 60)
            assert poll(lambda: c.health(READINESS), 90)
            assert c.generate("hi", max_new_tokens=3, ignore_eos=True).generated_token_count == 3
    finally:
        assert s.stop() == 0


def test_sigterm_drains_in_flight_work(tiny_llama_dir):
    s = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--drain-timeout", "30",
                      prefix=SLOW_STEPS)
    out: dict = {}

    def call():
        with s.client() as c:
            # slow steps: the 0.1 s poll below sees it running however fast the machine
            out["r"] = c.generate("hello", max_new_tokens=400, ignore_eos=True)

    t = threading.Thread(target=call)
    t.start()
    assert poll(lambda: s.metric("shardserve_running_requests") >= 1, 20)
    s.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert out["r"].generated_token_count == 400
    assert s.proc.wait(60) == 0


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_through_grpc_equals_local(smollm2_dir, tp):
    ref = local_greedy(smollm2_dir, "The capital of France is", 12)
    s = RunningServer(smollm2_dir, "--dtype", "fp32", "--tp", str(tp), "--threads",
                      "1" if tp > 1 else "2", "--kv-cache-tokens", "2048")
    try:
        with s.client() as c:
            r = c.generate("The capital of France is", max_new_tokens=12, temperature=0,
                           ignore_eos=True)
        assert r.token_ids == ref.token_ids
        if tp > 1:
            assert s.metric("shardserve_allreduce_seconds_count") > 0
    finally:
        assert s.stop() == 0


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus binary not installed (.ci/setup installs it)")
def test_real_prometheus_scrapes_us(server, tmp_path):
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: shardserve\n"
                   f"    static_configs:\n      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        q = urllib.parse.quote("shardserve_requests_total")

        def seen():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={q}",
                                            timeout=2) as r:
                    return bool(json.load(r)["data"]["result"])
            except OSError:
                return False
        assert poll(seen, 60), "Prometheus never scraped shardserve_requests_total"
    finally:
        prom.terminate()
        prom.wait(10)
