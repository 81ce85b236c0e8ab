"""The servicer's request lifecycle (api/servicer.py): a request the engine refuses after
admission ends with INVALID_ARGUMENT and is accounted exactly once (metrics, log line, the
in-flight count).

The engine here is a stand-in: the real one refuses after admission only when the worker
group rejects an AddRequest that passed the edge's checks, which the edge's validation makes
unreachable on purpose. The servicer, its metrics and the tokenizer are the real ones.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from shardserve_client._pb.shardserve.v1 import generate_pb2 as pb
from shardserve_server.api.convert import RequestLimits
from shardserve_server.api.metrics import Metrics
from shardserve_server.api.servicer import TextGenerationServicer
from shardserve_server.engine.async_engine import GroupFailed, RequestRefused
from shardserve_sharding.tokenizer import TokenizerBundle


class _RefusingStream:
    """What AsyncEngine.submit returns, for a request the group then refuses."""

    generated, final, timing = 0, None, {}

    def __init__(self, error: Exception) -> None:
        self.error = error

    def elapsed(self) -> float:
        return 0.01

    def close(self) -> None:
        pass

    async def results(self):
        raise self.error

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise self.error


class _Engine:
    def __init__(self, error: Exception) -> None:
        self.error, self.cancelled = error, []

    def check_capacity(self, n: int) -> None:
        pass

    def submit(self, req, priority, n=1):
        return _RefusingStream(self.error)

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code = None

    async def abort(self, code, message):
        self.code = code
        raise _Aborted(message)

    def time_remaining(self):
        return None


@pytest.mark.parametrize("error, code, outcome", [
    (RequestRefused("request refused: duplicate"), grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    (GroupFailed("the worker group died"), grpc.StatusCode.UNAVAILABLE, "error"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_engine_failure_after_admission_is_accounted_once(tiny_llama_dir, error, code,
                                                          outcome, streaming):
    tok = TokenizerBundle.load(tiny_llama_dir / "tokenizer")
    metrics = Metrics()
    s = TextGenerationServicer(_Engine(error), tok, SimpleNamespace(config={}),
                               RequestLimits(max_seq_len=512, max_new_tokens=64), metrics, {})
    ctx = _Context()
    msg = pb.GenerateRequest(prompt="hello there")
    msg.stopping.max_new_tokens = 4

    async def run():
        agen = s._run("Generate", msg, msg.prompt, ctx, streaming)
        with pytest.raises(_Aborted):
            async for _ in agen:
                pass

    asyncio.run(run())
    assert ctx.code is code
    assert s.active == 0  # released once, not twice
    counted = metrics.registry.get_sample_value(
        "shardserve_requests_total",
        {"method": "Generate", "outcome": outcome, "finish_reason": "error"})
    assert counted == 1


def test_a_call_ended_at_its_deadline_counts_as_deadline():
    """The client's deadline fires first and cancels: the server's copy still has its
    transit time left, which must not turn a missed deadline into a cancel."""
    from shardserve_server.api.servicer import DEADLINE_SLACK_S, past_deadline

    assert past_deadline(-0.5) and past_deadline(0.0) and past_deadline(DEADLINE_SLACK_S / 2)
    assert not past_deadline(None)  # no deadline: a cancel
    assert not past_deadline(DEADLINE_SLACK_S + 1.0)  # hung up well before it: a cancel
