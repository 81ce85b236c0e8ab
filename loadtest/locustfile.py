"""Locust load test of `shardserve serve`: gRPC streaming users (and an OpenAI HTTP user).

    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:50051 \\
        --csv loadtest/results/locust --csv-full-history --html loadtest/results/locust.html

`--host` is the gRPC target (host:port). Each user has its own gevent-friendly channel and
streams GenerateStream or ChatStream requests drawn from the weighted mix of locust_mix.py. Every
request fires locust request events, so locust's tables, CSVs and charts show:

- `grpc` / `<Method> <workload>`: end-to-end latency; response length = tokens generated;
- `TTFT` / `<workload>`: time to the first generated token;
- `ITL` / `per token`: the gap before each later token (its request rate is the token rate).

Any non-OK status is a failure, RESOURCE_EXHAUSTED (queue full) included, so overload shows
in the failure counts; so is a stream that ends with FINISH_REASON_ERROR. The load shape and the
options (`--shape`, `--step-users`, `--mix`, ...) are in locust_shape.py. `OpenAIHttpUser`
streams `POST /v1/completions` (SSE) from the OpenAI-compatible HTTP API; it runs only when
`--http-host` is given.
"""

from __future__ import annotations

import itertools
import json
import random
import time

# gRPC must cooperate with gevent before any channel exists (else streams stall until their
# deadline); locust has already monkey-patched the standard library by the time this runs.
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
import requests  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust_mix import DEFAULT_MIX, Workload, parse_mix, pick, prompt_for  # noqa: E402
from locust_shape import StepShape  # noqa: E402,F401 - locust finds the shape in this module
from stream_stats import SSEParser, TokenCounter, parse_event  # noqa: E402

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb  # noqa: E402
from shardserve_client._pb.shardserve.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

_counter = itertools.count()
_mix_cache: dict[str, dict[str, int]] = {}


def _mix(environment) -> dict[str, int]:
    spec = getattr(environment.parsed_options, "mix", None) or DEFAULT_MIX
    if spec not in _mix_cache:
        _mix_cache[spec] = parse_mix(spec)
    return _mix_cache[spec]


class StreamTimer:
    """Times one streamed request and fires its locust events (TTFT, ITL, end to end)."""

    def __init__(self, environment, request_type: str, name: str, workload: str) -> None:
        self.fire = environment.events.request.fire
        self.request_type, self.name, self.workload = request_type, name, workload
        self.t0 = time.perf_counter()
        self.last: float | None = None
        self.tokens = 0

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.fire(request_type="TTFT", name=self.workload,
                      response_time=(now - self.t0) * 1000.0, response_length=n, exception=None,
                      context={})
        else:
            gap_ms = (now - self.last) * 1000.0 / n
            for _ in range(n):
                self.fire(request_type="ITL", name="per token", response_time=gap_ms,
                          response_length=1, exception=None, context={})
        self.last = now
        self.tokens += n

    def done(self, exception: BaseException | None = None) -> None:
        self.fire(request_type=self.request_type, name=self.name,
                  response_time=(time.perf_counter() - self.t0) * 1000.0,
                  response_length=self.tokens, exception=exception, context={})


class StreamFailed(Exception):
    """A stream that ended badly: a gRPC status, an error finish reason, or no final details."""


class GrpcUser(User):
    """Streams GenerateStream / ChatStream over its own channel; `--host` is host:port."""

    host = "127.0.0.1:50051"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.timeout = getattr(opts, "request_timeout", 120.0)
        token = getattr(opts, "auth_token", "")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.rng = random.Random(next(_counter))
        info = self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=self.metadata)
        self.has_chat = info.has_chat_template

    def on_stop(self) -> None:
        self.channel.close()

    def _request(self, w: Workload):
        n = next(_counter)
        prompt = prompt_for(w, n)
        sampling = pb.SamplingParameters(temperature=0.7, top_p=0.9, seed=n)
        stopping = pb.StoppingCriteria(max_new_tokens=w.max_new_tokens, ignore_eos=w.ignore_eos)
        common = dict(sampling=sampling, stopping=stopping,
                      truncate_prompt_tokens=w.truncate_prompt_tokens)
        if w.chat and self.has_chat:
            req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=prompt)], **common)
            return "ChatStream", self.stub.ChatStream, req
        # a model without a chat template (the CI's tiny model) gets the question as a prompt
        return "GenerateStream", self.stub.GenerateStream, pb.GenerateRequest(prompt=prompt,
                                                                              **common)

    @task
    def stream(self) -> None:
        w = pick(_mix(self.environment), self.rng)
        method, call, req = self._request(w)
        timer = StreamTimer(self.environment, "grpc", f"{method} {w.name}", w.name)
        details = None
        try:
            for msg in call(req, timeout=self.timeout, metadata=self.metadata):
                timer.on_tokens(len(msg.tokens))
                if msg.HasField("details"):
                    details = msg.details
        except grpc.RpcError as e:
            timer.done(StreamFailed(f"{e.code().name}: {e.details()}"))
            return
        if details is None:
            timer.done(StreamFailed("stream ended without details"))
        elif details.finish_reason == pb.FINISH_REASON_ERROR:
            timer.done(StreamFailed(f"FINISH_REASON_ERROR: {details.error}"))
        else:
            timer.done()


class OpenAIHttpUser(User):
    """Streams `POST /v1/completions` with `"stream": true` (SSE `data:` chunks, then
    `data: [DONE]`) from the OpenAI-compatible API at `--http-host`; off without it."""

    http_api = True  # locust_shape.StepShape leaves this class out unless --http-host is set
    weight = 1

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.base = opts.http_host.rstrip("/")
        self.timeout = getattr(opts, "request_timeout", 120.0)
        self.session = requests.Session()
        token = getattr(opts, "auth_token", "")
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.rng = random.Random(next(_counter))
        self.model = "default"
        try:  # the served model's name, as OpenAI clients find it
            r = self.session.get(f"{self.base}/v1/models", timeout=10)
            self.model = r.json()["data"][0]["id"]
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pass

    def on_stop(self) -> None:
        self.session.close()

    @task
    def completion(self) -> None:
        w = pick(_mix(self.environment), self.rng)
        body = {"model": self.model, "prompt": prompt_for(w, next(_counter)),
                "max_tokens": w.max_new_tokens, "temperature": 0.7, "top_p": 0.9,
                "stream": True}
        if w.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension; other servers ignore unknown fields
        if w.truncate_prompt_tokens:
            body["truncate_prompt_tokens"] = w.truncate_prompt_tokens  # vLLM's, and ours
        timer = StreamTimer(self.environment, "http", f"completions {w.name}", w.name)
        parser, counter, done = SSEParser(), TokenCounter(), False
        try:
            with self.session.post(f"{self.base}/v1/completions", json=body, stream=True,
                                   timeout=self.timeout) as r:
                if r.status_code != 200:
                    raise StreamFailed(f"HTTP {r.status_code}: {r.text[:200]}")
                for chunk in r.iter_content(chunk_size=None):
                    for data in parser.feed(chunk):
                        obj = parse_event(data)
                        if obj is None:
                            done = True
                            break
                        timer.on_tokens(counter.tokens(obj))
            if not done:
                raise StreamFailed("stream ended without data: [DONE]")
        except (requests.RequestException, StreamFailed, RuntimeError,
                json.JSONDecodeError) as e:
            timer.done(e if isinstance(e, StreamFailed) else StreamFailed(repr(e)))
            return
        timer.done()


@events.test_start.add_listener
def _check_mix(environment, **_kw) -> None:
    _mix(environment)  # a bad --mix fails at the start, not in every task
