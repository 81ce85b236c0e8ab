"""The group leader's step loop (rank 0): requests in from the front end, steps, outputs out.

The messages are the typed ones of `protocol`: AddRequest / CancelRequest / StopGroup in;
Ready once (after loading and a warm-up step), StepOutputs after every step that produced
output and about once a second as a heartbeat, Fatal before the process dies, out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from typing import Any

import torch

from ..engine.runner import ForwardPlan, broadcast_plan
from ..engine.scheduler import GroupScheduler, SchedulerConfig, warmup_request
from .protocol import (
    AddRequest,
    CancelRequest,
    GroupStats,
    Ready,
    StepOutputs,
    StepTiming,
    StopGroup,
    TokenOutput,
    ToLeader,
)

HEARTBEAT_S = 1.0
STEP_TRACE_ENV = "SHARDSERVE_STEP_TRACE"
"""Profiling aid: a path PATH; each group leader appends one line per step (monotonic time,
step, prefill and decode seconds, prompt tokens, decode rows) to PATH.<its pid>, for
loadtest/step_trace.py. A file that cannot be opened or written ends the trace with one
warning, never the group."""
STEP_DELAY_ENV = "SHARDSERVE_FAULT_STEP_DELAY_S"
"""Fault injection for tests: seconds each step sleeps after its forward, a slow engine made
on purpose (the tests of a full queue, a drain and a frozen worker need requests that stay in
flight for seconds however fast the machine is). Unset or 0 in service."""
log = logging.getLogger("shardserve.leader")


def _step_delay(text: str | None) -> float:
    """STEP_DELAY_ENV's value in seconds: 0 when unset; a value that is not a finite number
    >= 0 is refused with one warning and ignored."""
    if not text:
        return 0.0
    try:
        delay = float(text)
    except ValueError:
        delay = -1.0
    if not 0.0 <= delay < float("inf"):
        log.warning("%s=%r is not a number of seconds >= 0: ignored", STEP_DELAY_ENV, text)
        return 0.0
    return delay


def _open_trace(path: str | None) -> Any:
    """The STEP_TRACE_ENV file of this leader (PATH.<pid>, line-buffered), or None."""
    if not path:
        return None
    try:
        return open(f"{path}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115
    except OSError as e:
        log.warning("no step trace: %s", e)
        return None


def trace_line(now: float, st: StepTiming) -> str:
    """One step of the STEP_TRACE_ENV file (loadtest/step_trace.py reads it)."""
    return (f"{now:.6f} {st.step_s:.6f} {st.prefill_s or 0:.6f} {st.decode_s or 0:.6f} "
            f"{st.prefill_tokens} {st.decode_rows} {st.prefill_rows}\n")


def log_internal(where: str, e: BaseException) -> None:
    """A bug caught at a request boundary: one line with the cause, the traceback at debug."""
    log.error("internal error in %s: %s: %s", where, type(e).__name__, e)
    log.debug("traceback", exc_info=e)


class Leader:
    def __init__(self, cfg: Any, runner: Any, comm: Any, conn: Any, load_s: float) -> None:
        from .model_dir import describe

        self.cfg, self.runner, self.comm, self.conn = cfg, runner, comm, conn
        self.load_s = load_s
        served = describe(cfg.model_dir)
        self.tokenizer = served.tokenizer
        eos = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        self.scheduler = GroupScheduler(
            SchedulerConfig(cfg.max_batch_size, cfg.kv_cache_tokens, cfg.block_size,
                            cfg.max_prefill_tokens, cfg.prefix_caching,
                            flat_batches=bool(getattr(runner, "flat_batches", False))),
            family=runner.family, tokenizer=self.tokenizer, eos_token_ids=eos,
            max_seq_len=served.max_seq_len, vocab_size=served.config.get("vocab_size"),
        )
        self.stopping = False
        self.tp = cfg.tp
        self.phase_s = {"prefill": 0.0, "decode": 0.0}
        self.last_step: StepTiming | None = None
        self.sent_stats = GroupStats()  # the stats of the last completed step, as last sent
        # followers block in a broadcast between steps; keep it shorter than pg_timeout_s
        self.keepalive_s = min(HEARTBEAT_S, float(getattr(cfg, "pg_timeout_s", 10.0)) / 4)
        self.last_bcast = time.monotonic()
        self.trace = _open_trace(os.environ.get(STEP_TRACE_ENV))
        self.step_delay_s = _step_delay(os.environ.get(STEP_DELAY_ENV))

    def _forward(self, plan: ForwardPlan) -> torch.Tensor:
        if self.tp > 1:
            broadcast_plan(plan)
            self.last_bcast = time.monotonic()
        return self.runner.forward(plan)

    def warmup(self) -> float:
        t0 = time.perf_counter()
        self.scheduler.add(warmup_request())  # weight copies built before readiness
        while self.scheduler.has_work():
            self.scheduler.step(self._forward)
        self.scheduler.reap()
        self.scheduler.reset_counters()  # the warm-up's steps and tokens are not served work
        return time.perf_counter() - t0

    def _handle(self, msg: ToLeader) -> list[TokenOutput]:
        if isinstance(msg, AddRequest):
            rid = msg.request.request_id
            try:
                self.scheduler.add(msg.request, msg.priority)
            except ValueError as e:
                return [TokenOutput(rid, error=str(e))]
            except Exception as e:  # a request must never take the group down
                log_internal("add", e)
                return [TokenOutput(rid, error=f"request refused: {e}")]
        elif isinstance(msg, CancelRequest):
            self.scheduler.cancel(msg.request_id)
        elif isinstance(msg, StopGroup):
            self.stopping = True
        else:
            log.error("unknown message from the front end: %s", type(msg).__name__)
        return []

    def _drain(self, block: bool) -> list[TokenOutput]:
        outputs: list[TokenOutput] = []
        timeout = 0.05 if block else 0.0
        while self.conn.poll(timeout):
            outputs += self._handle(self.conn.recv())
            timeout = 0.0
        return outputs

    def stats(self) -> GroupStats:
        return dataclasses.replace(
            self.scheduler.stats(), prefill_s_total=self.phase_s["prefill"],
            decode_s_total=self.phase_s["decode"],
            comm_s_total=self.runner.comm_seconds, forward_s_total=self.runner.forward_seconds,
            last_step=self.last_step)

    def _send(self, outputs: list[TokenOutput]) -> None:
        """Outputs with the last completed step's stats: a step's are not whole until it ends
        (the front end counts a step's metrics once, when its step count moves)."""
        self.conn.send(StepOutputs(outputs, self.sent_stats))

    def run(self) -> None:
        warm_s = self.warmup() if self.cfg.warmup else 0.0
        self.sent_stats = self.stats()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.conn.send(Ready(self.load_s, warm_s, rss_mb, self.runner.family))
        last_sent = time.monotonic()
        while True:
            outputs = self._drain(block=not self.scheduler.has_work())
            if self.stopping:
                if self.tp > 1:
                    broadcast_plan(ForwardPlan.stop())
                return
            outputs += self._step() if self.scheduler.has_work() else self.scheduler.reap()
            now = time.monotonic()
            if self.tp > 1 and now - self.last_bcast >= self.keepalive_s:
                broadcast_plan(ForwardPlan.keepalive())
                self.last_bcast = now
            if outputs or now - last_sent >= HEARTBEAT_S:
                self.sent_stats = self.stats()
                self._send(outputs)
                last_sent = now

    def _step(self) -> list[TokenOutput]:
        """One step through the scheduler's step loop, timed per phase."""
        timing: dict[str, Any] = {"batch": 0}
        comm0 = self.runner.comm_seconds
        t_step = time.perf_counter()

        def on_forward(plan: ForwardPlan, samples: list[bool], seconds: float) -> None:
            # a forward with prompt tokens is a prefill (a flat one carries decodes too; a
            # prompt chunk may be one token, e.g. the rest of a prompt found in the cache)
            phase = "decode" if plan.decode_only else "prefill"
            self.phase_s[phase] += seconds
            timing[f"{phase}_s"] = timing.get(f"{phase}_s", 0.0) + seconds
            timing[f"{phase}_rows"] = timing.get(f"{phase}_rows", 0) + len(samples)
            timing[f"{phase}_tokens"] = (timing.get(f"{phase}_tokens", 0)
                                         + int(plan.num_new.sum()))
            timing["batch"] += len(samples)

        outputs = self.scheduler.step(self._forward, flush=self._send, on_forward=on_forward)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.last_step = StepTiming(step_s=time.perf_counter() - t_step,
                                    comm_s=self.runner.comm_seconds - comm0, **timing)
        if self.trace is not None:
            try:
                self.trace.write(trace_line(time.monotonic(), self.last_step))
            except (OSError, ValueError) as e:
                log.warning("step trace stopped: %s", e)
                self.trace = None
        return outputs
