"""Shard-worker groups as real processes behind AsyncEngine: TP=1/2/3 give the tokens of the
in-process engine, cancelling frees KV blocks, a killed or hung rank fails its request with
EngineError and the group restarts, and `shardserve generate --tp 2` equals the plain CLI.

Engines are started once per module (on one event loop in a background thread) and shut down
in the fixture's teardown, which also checks that no worker process is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch
from grpc_servers import generate_tp1_and_tp2

from shardserve_server.engine.async_engine import AsyncEngine, EngineError, EngineLimits
from shardserve_server.engine.local import LocalEngine
from shardserve_server.engine.runner import CacheGeometry, ForwardPlan, ModelRunner
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams
from shardserve_server.workers.protocol import StepOutputs
from shardserve_server.workers.worker import WorkerConfig

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "hello there, general", "def add(a, b):"]
LAST_USE: dict[str, float] = {}


class LoopThread:
    """An asyncio loop in a daemon thread; run() waits for a coroutine with a timeout."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _ours() -> list:
    return [p for p in mp.active_children() if p.name.startswith("shardserve-")]


def _kill_all(procs) -> None:
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        p.kill()
        p.join(5)


class Engines:
    """Started engines by name; every one is shut down at module teardown."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.engines: dict[str, AsyncEngine] = {}

    def start(self, specs: dict[str, tuple[WorkerConfig, EngineLimits | None]],
              timeout: float = 180) -> None:
        new = {n: AsyncEngine(cfg, lim) for n, (cfg, lim) in specs.items()
               if n not in self.engines}
        self.engines.update(new)  # registered first: teardown covers a failed start

        async def go():
            await asyncio.gather(*(e.start() for e in new.values()))

        self.lt.run(go(), timeout)

    def __getitem__(self, name: str) -> AsyncEngine:
        return self.engines[name]

    def stop(self, name: str) -> None:
        self.lt.run(self.engines.pop(name).shutdown(), 60)

    def close(self) -> list:
        for name in list(self.engines):
            try:
                self.stop(name)
            except Exception:
                pass
        # a rank the group has just SIGKILLed can take a moment to be reaped on a loaded
        # machine (CI saw one still alive right after stop); one that outlives 15 s is a leak
        deadline = time.monotonic() + 15
        left = _ours()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _ours()
        _kill_all(left)
        return left


def greedy(prompt_ids, n: int, rid: str) -> GenerationRequest:
    return GenerationRequest(tuple(prompt_ids), SamplingParams(temperature=0.0),
                             StoppingParams(max_new_tokens=n, ignore_eos=True), rid)


async def run_all(engine: AsyncEngine, reqs, timeout: float = 60):
    """Submit all at once (they batch in the group); results in order."""
    streams = [engine.submit(r) for r in reqs]
    return await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), timeout)


async def wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, tiny_convlm_dir, tiny_rnnlm_dir):
    lt = LoopThread()
    reg = Engines(lt)
    base = {"threads": 1, "kv_cache_tokens": 4096, "max_batch_size": 8}
    try:
        reg.start({
            "llama1": (WorkerConfig(str(tiny_llama_dir), tp=1, **base), None),
            # the fault tests run on this one: short collective and hang timeouts
            "llama2": (WorkerConfig(str(tiny_llama_dir), tp=2, pg_timeout_s=5, **base),
                       EngineLimits(hang_timeout_s=8)),
            "conv2": (WorkerConfig(str(tiny_convlm_dir), tp=2, **base), None),
            "rnn2": (WorkerConfig(str(tiny_rnnlm_dir), tp=2, **base), None),
        })
        yield reg
    finally:
        left = reg.close()
        lt.close()
    assert not left, f"worker processes left behind: {[p.name for p in left]}"


@pytest.fixture(scope="module")
def local_llama(tiny_llama_dir):
    return LocalEngine.from_checkpoint(str(tiny_llama_dir))


def _reqs(local: LocalEngine, n: int, tag: str) -> list[GenerationRequest]:
    return [greedy(local.encode(p), n, f"{tag}{i}") for i, p in enumerate(PROMPTS)]


def test_tp1_and_tp2_groups_match_the_local_engine(engines, local_llama):
    reqs = _reqs(local_llama, 10, "a")
    want = [r.token_ids for r in local_llama.generate(reqs)]
    for name in ("llama1", "llama2"):
        got = engines.lt.run(run_all(engines[name], reqs), 90)
        LAST_USE[name] = time.monotonic()
        assert [r.token_ids for r in got] == want, name
        assert all(r.finish_reason.value == "max_tokens" for r in got)
    # requests without an id are named by the engine (distinct ids), not refused as duplicates
    anon = [dataclasses.replace(r, request_id="") for r in reqs[:2]]
    got = engines.lt.run(run_all(engines["llama1"], anon), 90)
    assert [r.token_ids for r in got] == want[:2]
    st = engines["llama2"].stats()
    assert st["restarts"] == 0 and st["group_up"] and len(st["pids"]) == 2
    # the ranks run below the front end's priority (WorkerConfig.nice)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, p) for p in st["pids"]] == [
        min(19, mine + WorkerConfig.nice)] * 2


@pytest.mark.parametrize("name,model_dir", [("conv2", "tiny_convlm_dir"),
                                            ("rnn2", "tiny_rnnlm_dir")])
def test_state_slot_families_at_tp2_match_the_local_engine(engines, request, name, model_dir):
    """The conv LM and the recurrent LM (per-sequence state slots) served by a TP=2 group give
    the greedy tokens of the TP=1 local engine."""
    local = LocalEngine.from_checkpoint(str(request.getfixturevalue(model_dir)))
    reqs = _reqs(local, 10, name)
    want = [r.token_ids for r in local.generate(reqs)]
    got = engines.lt.run(run_all(engines[name], reqs), 90)
    assert [r.token_ids for r in got] == want


def test_cancelled_streams_free_their_kv_blocks(engines, local_llama):
    """One stream is abandoned (the consumer stops iterating), one cancelled by id: both end
    in the group, kv_used_blocks returns to 0, and the engine keeps serving."""
    engine = engines["llama2"]
    ids = local_llama.encode(PROMPTS[0])

    async def scenario():
        async def abandon():
            n = 0
            async for _ev in engine.submit(greedy(ids, 400, "abandoned")):
                n += 1
                if n == 3:
                    break  # the stream is dropped: its finaliser cancels the request
            return n

        stream = engine.submit(greedy(ids, 400, "by-id"))
        it = stream.__aiter__()
        await asyncio.wait_for(it.__anext__(), 30)
        await wait_for(lambda: engine.stats()["kv_used_blocks"] > 0, 10, "KV in use")
        assert await asyncio.wait_for(abandon(), 30) == 3
        never_read = engine.submit(greedy(ids, 400, "never-read"), n=3)
        await wait_for(lambda: sum(r.startswith("never-read") for r in engine.inflight) == 3,
                       10, "the three samples in the group")
        never_read.close()  # an SSE response closed before its first chunk does this
        assert "never-read" not in engine._families  # no family entry outlives its request
        assert engine.cancel("by-id")
        last = None
        async for ev in it:
            last = ev
        assert last.result is not None and last.result.finish_reason.value == "cancelled"
        assert len(last.result.token_ids) < 400
        await wait_for(lambda: engine.stats()["kv_used_blocks"] == 0 and not engine.inflight,
                       5, "KV blocks freed")
        return await run_all(engine, [greedy(ids, 5, "after-cancel")])

    (res,) = engines.lt.run(scenario(), 60)
    LAST_USE["llama2"] = time.monotonic()
    assert res.token_ids == local_llama.generate([greedy(ids, 5, "x")])[0].token_ids


def test_smollm2_tp3_matches_tp1(engines, smollm2_dir, smollm2):
    """SmolLM2 in three shard-worker processes (1 thread each) gives the greedy tokens of one
    process; in-process (thread ranks) TP=3 logits of a ragged step are within 1e-5 of TP=1."""
    from shardserve_sharding.sharded_load import load_sharded_model
    from shardserve_sharding.tp.comm import run_ranks

    tok = smollm2.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):"]
    reqs = [greedy(tok.encode(p), 12, f"s{i}") for i, p in enumerate(prompts)]
    cfg = {"threads": 1, "kv_cache_tokens": 512, "max_batch_size": 4}
    engines.start({"smol3": (WorkerConfig(str(smollm2_dir), tp=3, **cfg), None),
                   "smol1": (WorkerConfig(str(smollm2_dir), tp=1, **cfg), None)}, timeout=240)
    try:
        tp3 = engines.lt.run(run_all(engines["smol3"], reqs, 120), 150)
        tp1 = engines.lt.run(run_all(engines["smol1"], reqs, 120), 150)
    finally:
        engines.stop("smol3")
        engines.stop("smol1")
    assert [r.token_ids for r in tp3] == [r.token_ids for r in tp1]
    assert all(len(r.token_ids) == 12 for r in tp1)

    ids = [tok.encode(p) for p in prompts]
    t = max(map(len, ids))
    toks = torch.zeros(2, t, dtype=torch.long)
    for i, x in enumerate(ids):
        toks[i, : len(x)] = torch.tensor(x)
    num_new = torch.tensor([len(x) for x in ids])
    plan = ForwardPlan(toks, torch.arange(t).expand(2, t).contiguous(), num_new, num_new - 1,
                       torch.tensor([[0, 1], [2, 3]]))
    geo = CacheGeometry(64, block_size=16, max_slots=2)

    def rank_fn(comm, rank):
        return ModelRunner(load_sharded_model(smollm2_dir, comm), geo, torch.float32).forward(
            plan)

    full = ModelRunner(smollm2.model, geo, torch.float32).forward(plan)
    for out in run_ranks(3, rank_fn):
        assert float((out - full).abs().max() / full.abs().max()) <= 1e-5


def test_idle_tp2_group_outlives_the_collective_timeout(engines, local_llama):
    """Followers wait in a broadcast between steps; an idle leader keeps them alive, so a TP=2
    group left idle longer than pg_timeout_s (the SmolLM2 test above ran meanwhile) is still
    the same group and serves."""
    engine = engines["llama2"]
    idle = time.monotonic() - LAST_USE.get("llama2", time.monotonic())
    time.sleep(max(0.0, engine.worker_cfg.pg_timeout_s + 1.5 - idle))
    st = engine.stats()
    assert st["restarts"] == 0 and st["group_up"]
    ids = local_llama.encode(PROMPTS[2])
    (res,) = engines.lt.run(run_all(engine, [greedy(ids, 6, "after-idle")]), 60)
    assert res.token_ids == local_llama.generate([greedy(ids, 6, "x")])[0].token_ids
    assert engine.stats()["restarts"] == 0


def _fault_scenario(engines, local_llama, sig: int, fail_within: float):
    """Stream a long request on the TP=2 group, send `sig` to the follower after a few tokens:
    the request must fail with EngineError within `fail_within` s, the group restarts once and
    serves the next request correctly."""
    engine = engines["llama2"]
    ids = local_llama.encode(PROMPTS[1])
    restarts = engine.stats()["restarts"]
    old = engine.stats()["pids"]
    follower = old[1]

    async def scenario():
        it = engine.submit(greedy(ids, 480, f"victim-{sig}")).__aiter__()
        for _ in range(5):
            await asyncio.wait_for(it.__anext__(), 30)
        os.kill(follower, sig)
        t0 = time.monotonic()
        got = 5
        with pytest.raises(EngineError):
            while True:
                ev = await asyncio.wait_for(it.__anext__(), fail_within + 5)
                assert ev.result is None, "the request finished despite the dead rank"
                got += 1
        failed_s = time.monotonic() - t0
        await wait_for(lambda: engine.stats()["restarts"] == restarts + 1, 10, "restart")
        up_s = await wait_for(lambda: engine.group_up, 90, "group back up")
        res = await run_all(engine, [greedy(ids, 8, f"after-{sig}")])
        return failed_s, up_s, got, res[0]

    try:
        failed_s, up_s, got, res = engines.lt.run(scenario(), 150)
    finally:
        # never leave a stopped or orphaned rank behind (only our own children: pids recycle)
        _kill_all([p for p in _ours() if p.pid in old])
    assert failed_s < fail_within, failed_s
    assert got < 480
    st = engine.stats()
    assert st["restarts"] == restarts + 1 and st["group_up"]
    assert len(st["pids"]) == 2 and not set(st["pids"]) & set(old)
    assert res.token_ids == local_llama.generate([greedy(ids, 8, "x")])[0].token_ids
    return failed_s


def test_killed_rank_fails_the_request_and_the_group_restarts(engines, local_llama):
    assert engines["llama2"].stats()["restarts"] == 0
    _fault_scenario(engines, local_llama, signal.SIGKILL, fail_within=5)
    assert engines["llama2"].stats()["restarts"] == 1


def test_hung_rank_fails_the_request_within_the_timeouts(engines, local_llama):
    """SIGSTOP a follower: the leader's collective times out (pg_timeout_s=5; the front end's
    hang watchdog is at 8 s), the request fails, the group restarts."""
    _fault_scenario(engines, local_llama, signal.SIGSTOP, fail_within=5 + 5)


def test_cli_generate_tp2_equals_plain_generate(tiny_llama_dir):
    plain, tp2 = generate_tp1_and_tp2(tiny_llama_dir)
    assert len(plain["token_ids"]) == 8
    for key in ("token_ids", "text", "finish_reason", "prompt_tokens"):
        assert tp2[key] == plain[key], key


@pytest.mark.parametrize("flat", [False, True])
def test_prefill_first_tokens_go_out_before_the_decode_forward(tiny_llama_dir, flat):
    """Padded plans: a step with a prefill and decode rows sends the prefill's first token
    before the decode forward, carrying the last completed step's stats (the front end counts a
    step's metrics once, when the step count moves); the full step's stats follow with both
    phases. FLAT plans: one forward serves both, so both tokens come out together at its end
    and nothing is sent mid-step."""
    from shardserve_server.workers.leader import Leader
    from shardserve_sharding.checkpoint.io import load_model

    cfg = WorkerConfig(str(tiny_llama_dir), kv_cache_tokens=256, block_size=4, warmup=False)
    loaded = load_model(tiny_llama_dir)
    runner = ModelRunner(loaded.model, CacheGeometry(256, 4, 8), torch.float32)
    runner.flat_batches = flat
    ours, theirs = mp.Pipe()
    leader = Leader(cfg, runner, None, ours, 0.0)  # TP=1: no collectives
    assert leader.scheduler.cfg.flat_batches is flat

    def req(rid):  # b finds a's first block cached: its prompt chunk is one token, a prefill
        return GenerationRequest((5, 6, 7, 8, 9), SamplingParams(temperature=0.0),
                                 StoppingParams(8, ignore_eos=True), rid)

    leader.scheduler.add(req("a"))
    leader._step()  # a's prefill
    leader.sent_stats = leader.stats()
    before = leader.sent_stats.steps
    leader.scheduler.add(req("b"))
    outputs = leader._step()  # b's prefill and a's decode
    last = leader.stats()
    assert last.steps == before + 1
    if flat:
        assert not theirs.poll(0.5)  # nothing mid-step
        assert sorted(o.request_id for o in outputs) == ["a", "b"]
        assert last.last_step.batch == 2 and last.last_step.prefill_s is not None
        return
    assert theirs.poll(10)
    mid = theirs.recv()
    assert isinstance(mid, StepOutputs) and [o.request_id for o in mid.outputs] == ["b"]
    assert mid.stats.steps == before  # not this step's partial stats
    assert [o.request_id for o in outputs] == ["a"]
    step = last.last_step
    assert step.prefill_s is not None and step.decode_s is not None and step.batch == 2, step


def test_step_delay_hook_reads_seconds_and_refuses_the_rest(caplog):
    """SHARDSERVE_FAULT_STEP_DELAY_S (the tests' slow engine): seconds >= 0, anything else
    ignored with one warning, never an error that would stop the group."""
    from shardserve_server.workers.leader import _step_delay

    assert _step_delay(None) == 0.0 and _step_delay("") == 0.0
    assert _step_delay("0.01") == 0.01 and _step_delay("0") == 0.0
    for bad in ("x", "-1", "nan", "inf"):
        caplog.clear()
        assert _step_delay(bad) == 0.0
        assert "FAULT_STEP_DELAY" in caplog.text
