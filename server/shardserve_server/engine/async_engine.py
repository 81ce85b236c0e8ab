"""The engine the front end talks to: admission, the waiting queue, streams, group supervision.

    engine = AsyncEngine(WorkerConfig(model_dir, tp=2), EngineLimits())
    await engine.start()
    async for out in engine.submit(request):     # TokenOutput per token, last one has .result
        ...
    stream = engine.submit(request, n=4)          # 4 samples: events carry .index 0..3
    results = await stream.results()              # one GenerationResult per sample
    engine.cancel(request_id); engine.stats(); await engine.shutdown()

The waiting queue lives here, in the front-end process, bounded by requests and by queued
prompt tokens (QueueFull at once when over). Requests are handed to the worker group only as
it has room (running + handed-over < max_batch_size + lookahead), so queued work can still be
moved elsewhere; the group's leader does the step-level batching. When the group dies (a rank
crashed, was killed, or stopped making progress), its in-flight requests fail with
EngineError, the group is restarted (counted in `restarts`) and the queue continues.

Parallel sampling (n > 1) fans one request out here, as vLLM v1 does: n child requests
(ids `ID#i`, seeds `seed + i` mod 2^64 when seeded, so sample 0 is the n = 1 answer) that
count n times against the queue limits, share one event queue and one RequestStream, and are
cancelled together. The group's prefix cache shares the prompt's full blocks between them
(the scheduler holds the later children back until the first has prefilled them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..workers.group import GroupDied, WorkerGroup
from ..workers.protocol import (
    AddRequest,
    CancelRequest,
    Fatal,
    FromLeader,
    GroupDead,
    GroupStats,
    Ready,
    StepOutputs,
    TokenOutput,
)
from ..workers.worker import WorkerConfig
from .sequence import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

MAX_N = 16
"""Most samples per request (n)."""
_SEED_MOD = 2**64


def child_seed(seed: int | None, index: int) -> int | None:
    """Sample `index`'s seed: seed + index (mod 2^64); None stays None (each child then
    draws its own generator from the OS entropy pool)."""
    return None if seed is None else (seed + index) % _SEED_MOD


def sample_requests(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The n requests of an n-sample request: sample i is `{id}#{i}`, seeded child_seed(seed,
    i) (n == 1: the request itself)."""
    if n == 1:
        return [req]
    return [dataclasses.replace(req, request_id=f"{req.request_id}#{i}", sampling=dataclasses
                                .replace(req.sampling, seed=child_seed(req.sampling.seed, i)))
            for i in range(n)]


class QueueFull(RuntimeError):
    """The waiting queue is at its request or token limit."""


class EngineError(RuntimeError):
    """A request failed inside the engine (e.g. its worker group died)."""


class GroupFailed(EngineError):
    """The request's worker group died (a crashed or unreachable rank) while it ran: the group
    restarts, so the same request may succeed again (gRPC UNAVAILABLE, HTTP 503)."""


class RequestRefused(EngineError):
    """The worker group refused the request (it can never fit there, or its constraint does
    not compile): the caller's request, not the engine, is at fault."""


@dataclass(frozen=True)
class EngineLimits:
    """Front-end admission limits."""

    max_queued_requests: int = 256
    """Requests waiting for a group (not yet running) before QueueFull."""
    max_queued_tokens: int = 1 << 20
    """Prompt tokens waiting before QueueFull."""
    lookahead: int = 4
    """Requests handed to a group beyond its batch size, so it never waits for the front end."""
    hang_timeout_s: float = 20.0
    """No step progress for this long while work is pending: the group is declared hung."""
    restart: bool = True
    """Restart a dead group automatically."""


@dataclass
class _Request:
    req: GenerationRequest
    priority: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0
    """Sample index within its parent (n > 1)."""
    submitted: float = field(default_factory=time.monotonic)
    dispatched: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    replica: int | None = None
    requeues: int = 0
    admitted: float | None = None
    finished: float | None = None
    started_streaming: bool = False
    done: bool = False


class RequestStream:
    """Async iterator over one request's TokenOutputs (of all its n samples, interleaved,
    each tagged with its index); raises EngineError on failure. Ends once every sample has
    its result; leaving early cancels the samples still running."""

    def __init__(self, engine: AsyncEngine, rs: list[_Request], request_id: str) -> None:
        self._engine, self._rs = engine, rs
        self.request_id = request_id
        self.n = len(rs)
        self._done: list[GenerationResult | None] = [None] * self.n
        self.final: GenerationResult | list[GenerationResult] | None = None
        """Once the stream has yielded every sample's result: the result (n == 1) or the
        list of results by sample index."""

    def __aiter__(self) -> AsyncIterator[TokenOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[TokenOutput]:
        queue = self._rs[0].queue  # shared by the samples
        left = self.n
        try:
            while left:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.result is not None:
                    left -= 1
                    self._done[item.index] = item.result
                    if not left:
                        self.final = self._done[0] if self.n == 1 else list(self._done)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the samples still running in the group and forget the request's family
        (idempotent). Iterating to the end, or leaving the iteration, calls it; a caller that
        may stop before iterating at all (an SSE response closed before its first chunk)
        calls it itself, since a generator that never started runs no `finally`."""
        for r in self._rs:
            if not r.done:  # consumer went away (or a sibling failed): cancel in the group
                self._engine.cancel(r.req.request_id)
        self._engine._families.pop(self.request_id, None)

    @property
    def timing(self) -> dict[str, float | None]:
        """Seconds from submission: queue (to the first admission), first token (of any
        sample), total (the last sample's end)."""
        submitted = self._rs[0].submitted

        def since(ts: list[float | None], pick: Any) -> float | None:
            got = [t for t in ts if t is not None]
            if not got or (pick is max and len(got) < len(ts)):
                return None
            return max(0.0, pick(got) - submitted)

        return {"queue_s": since([r.admitted for r in self._rs], min),
                "ttft_s": since([r.first_token for r in self._rs], min),
                "total_s": since([r.finished for r in self._rs], max)}

    def elapsed(self) -> float:
        """Seconds since submission, now (a request that never finished still has an age)."""
        return max(0.0, time.monotonic() - self._rs[0].submitted)

    @property
    def generated(self) -> int:
        """Tokens generated so far by all samples (also those cancelled midway)."""
        return sum(r.generated for r in self._rs)

    async def results(self) -> list[GenerationResult]:
        """Every sample's result, by index."""
        out: list[GenerationResult | None] = [None] * self.n
        async for ev in self:
            if ev.result is not None:
                out[ev.index] = ev.result
        if any(r is None for r in out):
            raise EngineError(f"{self.request_id}: stream ended without a result")
        return out  # type: ignore[return-value]

    async def result(self) -> GenerationResult:
        """The result of a single-sample request (sample 0's with n > 1)."""
        return (await self.results())[0]


class _Replica:
    """One worker group behind the shared queue, and what the front end knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.group: WorkerGroup | None = None
        self.up = False
        self.stats = GroupStats()
        """As of the leader's last message."""
        self.inflight: dict[str, _Request] = {}
        self.restarts = 0
        self.restarting = False
        self.last_progress = time.monotonic()
        self.last_steps = -1
        self.ready_info: Ready | None = None
        self.fatal: str | None = None
        """The last Fatal message of the group's ranks."""
        self.last_start_error: str | None = None

    def load(self) -> int:
        """Outstanding tokens: what the group still has to compute for its requests."""
        return sum(len(r.req.prompt_ids) * (not r.started_streaming) + r.req.stopping
                   .max_new_tokens - r.generated for r in self.inflight.values())


class AsyncEngine:
    def __init__(self, worker: WorkerConfig, limits: EngineLimits | None = None,
                 on_stats: Any = None, replicas: int = 1, on_token_gap: Any = None) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.worker_cfg = worker
        self.on_stats = on_stats  # called with (stats, replica index) per leader message
        # called with the seconds between two consecutive tokens of one request, per token
        self.on_token_gap = on_token_gap
        self.limits = limits or EngineLimits()
        self.waiting: deque[_Request] = deque()
        self.queued_tokens = 0
        self.replicas = [_Replica(i) for i in range(replicas)]
        self.requeued = 0
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._watchdog: asyncio.Task | None = None
        self._families: dict[str, list[str]] = {}
        """Parent request id -> its samples' ids (n > 1), for cancelling them together."""

    # ---- views over the replicas
    @property
    def group_up(self) -> bool:
        return all(r.up for r in self.replicas)

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    @property
    def inflight(self) -> dict[str, _Request]:
        out: dict[str, _Request] = {}
        for rep in self.replicas:
            out.update(rep.inflight)
        return out

    # ---- lifecycle
    async def start(self) -> Ready:
        """Start every replica's group; the first replica's Ready message."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._start_group(rep) for rep in self.replicas))
        self._watchdog = asyncio.create_task(self._watch())
        assert self.replicas[0].ready_info is not None
        return self.replicas[0].ready_info

    async def _start_group(self, rep: _Replica) -> None:
        group = WorkerGroup(self.worker_cfg, lambda msg, rep=rep: self._threadsafe(rep, msg),
                            name=f"replica{rep.index}")
        rep.group = group
        rep.ready_info = await asyncio.get_running_loop().run_in_executor(None, group.start)
        rep.up = True
        rep.last_progress = time.monotonic()
        self._dispatch()

    async def shutdown(self) -> None:
        self._closing = True
        if self._watchdog:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, rep.group.stop)
                               for rep in self.replicas if rep.group))
        for rep in self.replicas:
            rep.up = False
            for r in list(rep.inflight.values()):
                self._fail(r, EngineError("engine shut down"))
            rep.inflight.clear()
        for r in list(self.waiting):
            self._fail(r, EngineError("engine shut down"))
        self.waiting.clear()

    # ---- requests
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def check_capacity(self, n: int = 1) -> None:
        """Raise QueueFull if a request of n samples submitted now would be refused for queue
        space (the token limit is checked at submit, once the prompt is tokenized). ValueError
        when n alone exceeds the queue: such a request could never be admitted."""
        if n > self.limits.max_queued_requests:
            raise ValueError(f"n = {n} samples exceed the server's max_queued_requests "
                             f"({self.limits.max_queued_requests})")
        if len(self.waiting) + n > self.limits.max_queued_requests:
            raise QueueFull(f"queue full: {len(self.waiting)} requests waiting "
                            f"(max_queued_requests={self.limits.max_queued_requests})")

    def submit(self, req: GenerationRequest, priority: int = 0, n: int = 1) -> RequestStream:
        """Queue a request of n samples (validated here); QueueFull when the queue is at its
        limits (each sample counts as one request and its prompt tokens)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
        if not req.prompt_ids:
            raise ValueError("prompt must not be empty")
        if not req.request_id:  # the caller gave none: the engine names it
            req = dataclasses.replace(req, request_id=self.new_request_id())
        parent = req.request_id
        reqs = sample_requests(req, n)
        ids = {r.request_id for r in reqs} | {parent}
        if parent in self._families or any(i in self.inflight for i in ids) or any(
            w.req.request_id in ids for w in self.waiting
        ):
            raise ValueError(f"duplicate request id {parent!r}")
        if self._closing:
            raise EngineError("engine is shutting down")
        tokens = len(req.prompt_ids) * n
        self.check_capacity(n)
        if self.queued_tokens + tokens > self.limits.max_queued_tokens:
            raise QueueFull(f"queue full: {self.queued_tokens} prompt tokens waiting "
                            f"(max_queued_tokens={self.limits.max_queued_tokens})")
        queue: asyncio.Queue = asyncio.Queue()
        rs = [_Request(r, priority, queue, index=i) for i, r in enumerate(reqs)]
        self.waiting.extend(rs)
        self.queued_tokens += tokens
        if n > 1:
            self._families[parent] = [r.request_id for r in reqs]
        self._dispatch()
        return RequestStream(self, rs, parent)

    def cancel(self, request_id: str) -> bool:
        """Cancel a request (all n samples when given the id of a request with n > 1)."""
        children = self._families.get(request_id)
        if children is not None:
            return any([self.cancel(c) for c in children])
        for r in self.waiting:
            if r.req.request_id == request_id:
                self.waiting.remove(r)
                self.queued_tokens -= len(r.req.prompt_ids)
                self._finish_cancelled(r)
                return True
        for rep in self.replicas:
            if request_id in rep.inflight and rep.group is not None:
                try:
                    rep.group.send(CancelRequest(request_id))
                except GroupDied:
                    pass
                return True
        return False

    def _finish_cancelled(self, r: _Request) -> None:
        from .stopping import FinishReason

        res = GenerationResult(r.req.request_id, "", [], FinishReason.CANCELLED,
                               len(r.req.prompt_ids))
        r.done = True
        r.queue.put_nowait(TokenOutput(r.req.request_id, result=res, index=r.index))

    def _dispatch(self) -> None:
        """Hand waiting requests (priority first) to the least-loaded replica with room."""
        if not self.waiting:
            return
        cap = self.worker_cfg.max_batch_size + self.limits.lookahead
        order = sorted(self.waiting, key=lambda r: -r.priority)
        for r in order:
            live = [rep for rep in self.replicas
                    if rep.up and rep.group is not None and len(rep.inflight) < cap]
            if not live:
                return
            rep = min(live, key=lambda x: (x.load(), len(x.inflight), x.index))
            try:
                rep.group.send(AddRequest(r.req, r.priority))
            except GroupDied:
                continue
            self.waiting.remove(r)
            self.queued_tokens -= len(r.req.prompt_ids)
            r.dispatched = time.monotonic()
            r.replica = rep.index
            rep.inflight[r.req.request_id] = r

    # ---- messages from the groups (reader threads -> loop thread)
    def _threadsafe(self, rep: _Replica, msg: FromLeader | GroupDead) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_message, rep, msg)

    def _on_message(self, rep: _Replica, msg: FromLeader | GroupDead) -> None:
        if isinstance(msg, StepOutputs):
            stats = msg.stats
            rep.stats = stats
            if self.on_stats is not None:
                try:  # an observer's bug must not stop delivery (the group would look hung)
                    self.on_stats(stats, rep.index)
                except Exception:
                    log.exception("on_stats callback failed; tokens are still delivered")
            if stats.steps != rep.last_steps or not rep.inflight:
                rep.last_steps = stats.steps
                rep.last_progress = time.monotonic()
            for out in msg.outputs:
                self._deliver(rep, out)
            self._dispatch()
        elif isinstance(msg, GroupDead):
            self._on_dead(rep, msg.reason)
        elif isinstance(msg, Fatal):
            rep.fatal = msg.message

    def _deliver(self, rep: _Replica, out: TokenOutput) -> None:
        r = rep.inflight.get(out.request_id)
        if r is None:
            return
        if out.error is not None:
            del rep.inflight[out.request_id]
            self._fail(r, RequestRefused(out.error))
            return
        now = time.monotonic()
        if out.token_id is not None:
            if r.first_token is None:
                r.first_token = now
            elif self.on_token_gap is not None and r.last_token is not None:
                self.on_token_gap(now - r.last_token)
            r.last_token = now
            r.started_streaming = True
            r.generated += 1
        if out.admitted_at is not None:
            r.admitted = out.admitted_at
        if out.result is not None:
            del rep.inflight[out.request_id]
            r.finished = now
            r.done = True
        if out.token_id is not None or out.result is not None:
            r.queue.put_nowait(dataclasses.replace(out, index=r.index) if r.index else out)

    def _fail(self, r: _Request, exc: BaseException) -> None:
        if not r.done:
            r.done = True
            r.queue.put_nowait(exc)

    def _on_dead(self, rep: _Replica, reason: str) -> None:
        was_up, rep.up = rep.up, False
        # Work that had not streamed anything yet goes back to the front of the queue (another
        # replica, or this one once restarted, runs it from scratch); streaming work fails.
        back = []
        can_retry = self.limits.restart or len(self.replicas) > 1
        for r in list(rep.inflight.values()):
            if not r.started_streaming and can_retry and r.requeues < 1:
                r.requeues += 1
                back.append(r)
            else:
                self._fail(r, GroupFailed(f"worker group {rep.index} failed: {reason}"))
        rep.inflight.clear()
        for r in reversed(back):
            r.dispatched = None
            self.waiting.appendleft(r)
            self.queued_tokens += len(r.req.prompt_ids)
            self.requeued += 1
        self._dispatch()
        if self._closing or not self.limits.restart or rep.restarting or not was_up:
            return
        rep.restarts += 1
        rep.restarting = True
        asyncio.ensure_future(self._restart(rep))

    async def _restart(self, rep: _Replica) -> None:
        try:
            while not self._closing:
                try:
                    await self._start_group(rep)
                    return
                except GroupDied as e:
                    rep.last_start_error = str(e)
                    await asyncio.sleep(1.0)
        finally:
            rep.restarting = False

    async def _watch(self) -> None:
        """Declare a group hung when it makes no step progress while work is pending."""
        while not self._closing:
            await asyncio.sleep(0.5)
            for rep in self.replicas:
                if not rep.up or not rep.inflight:
                    rep.last_progress = time.monotonic()
                    continue
                if time.monotonic() - rep.last_progress > self.limits.hang_timeout_s:
                    group = rep.group
                    if group is not None and not group.dead:
                        await asyncio.get_running_loop().run_in_executor(
                            None, group._die,
                            f"no step progress for {self.limits.hang_timeout_s:.0f} s (hung rank)")

    # ---- introspection
    @property
    def ready(self) -> bool:
        """Serving: every replica up and (no pending work or recent step progress)."""
        now = time.monotonic()
        for rep in self.replicas:
            if not rep.up:
                return False
            if rep.inflight and now - rep.last_progress > self.limits.hang_timeout_s / 2:
                return False
        return True

    def replica_stats(self) -> list[dict[str, Any]]:
        out = []
        for rep in self.replicas:
            st = rep.stats
            out.append({
                "replica": rep.index, "up": rep.up, "restarts": rep.restarts,
                "inflight": len(rep.inflight), "running": st.running, "kv_usage": st.kv_usage,
                "kv_used_blocks": st.kv_used_blocks, "kv_total_blocks": st.kv_total_blocks,
                "reserved_tokens": st.reserved_tokens, "tokens_out": st.tokens_out,
                "steps": st.steps, "prefix_cache_queries": st.prefix_cache_queries,
                "prefix_cache_hits": st.prefix_cache_hits,
                "pids": rep.group.pids if rep.group else [],
            })
        return out

    def stats(self) -> dict[str, Any]:
        reps = self.replica_stats()
        first = self.replicas[0].stats
        n = len(reps)
        return {
            "queue_depth": len(self.waiting), "queued_tokens": self.queued_tokens,
            "inflight": sum(r["inflight"] for r in reps),
            "running": sum(r["running"] for r in reps),
            "kv_usage": sum(r["kv_usage"] for r in reps) / n,
            "kv_used_blocks": sum(r["kv_used_blocks"] for r in reps),
            "reserved_tokens": sum(r["reserved_tokens"] for r in reps),
            "steps": sum(r["steps"] for r in reps), "last_step": first.last_step,
            "phase_s": {"prefill": first.prefill_s_total, "decode": first.decode_s_total},
            "comm_s": first.comm_s_total,
            "group_up": self.group_up, "restarts": self.restarts, "requeued": self.requeued,
            "pids": [p for r in reps for p in r["pids"]], "replicas": reps,
        }
