"""Replicas behind the client's own balancing: two real servers, one Client over both (gRPC's
round_robin with client-side health checking): calls alternate between them, and a server that
reports NOT_SERVING (it drains with a request stuck in flight) gets no calls at all while the
other serves them; a plain client sent to it is refused (so the count below can move)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from grpc_servers import SLOW_STEPS, RunningServer, poll

from shardserve_client import READINESS, Client, Unavailable

pytestmark = pytest.mark.slow


def _calls(s: RunningServer) -> float:
    try:
        return s.metric("shardserve_requests_total", 'method="Generate"')
    except KeyError:
        return 0.0


def test_round_robin_skips_a_server_that_is_not_ready(tiny_llama_dir):
    args = ("--dtype", "fp32", "--max-batch-size", "4", "--kv-cache-tokens", "2048",
            "--threads", "1")
    a = RunningServer(tiny_llama_dir, *args)
    b = RunningServer(tiny_llama_dir, *args, "--drain-timeout", "60", prefix=SLOW_STEPS)
    stopped: list[int] = []
    try:
        with Client([a.target, b.target], timeout=30) as c:
            def call() -> bool:
                return c.generate("hi", max_new_tokens=2, ignore_eos=True).generated_token_count > 0

            # a subchannel joins the round robin once it is READY, which on a loaded machine
            # may take a few calls: call until both have served one, then count
            assert poll(lambda: call() and min(_calls(a), _calls(b)) >= 1, 30)
            a0, b0 = _calls(a), _calls(b)
            for _ in range(8):
                assert call()
            # round robin over both: the 8 calls alternate (3 allows one reconnect)
            da, db = _calls(a) - a0, _calls(b) - b0
            assert da + db == 8 and min(da, db) >= 3, (da, db)

            before_b = _calls(b)
            stuck: dict = {}

            def hold():  # b's only request, frozen in flight with its worker
                try:
                    with b.client() as bc:
                        stuck["r"] = bc.generate("hello", max_new_tokens=400, ignore_eos=True)
                except Exception as e:  # noqa: BLE001 - reported below if it matters
                    stuck["e"] = e

            t = threading.Thread(target=hold, daemon=True)
            t.start()
            assert poll(lambda: b.metric("shardserve_running_requests") >= 1, 20)
            for pid in b.children():
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            b.proc.send_signal(signal.SIGTERM)  # drains: NOT_SERVING, the request still runs
            with b.client() as bc:
                assert poll(lambda: not bc.health(READINESS), 10)
                with pytest.raises(Unavailable):
                    bc.generate("hi", max_new_tokens=2)
            refused = _calls(b)
            assert refused == before_b + 1  # the refusal is counted (the stuck one is not yet)

            served = _calls(a)
            for _ in range(6):
                assert c.generate("hi", max_new_tokens=2, ignore_eos=True).generated_token_count
            assert _calls(a) == served + 6
            assert _calls(b) == refused  # health checking kept every call away from b
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert a.stop() == 0
        b.stop()
