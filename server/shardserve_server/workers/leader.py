"""The group leader's step loop (rank 0): requests in from the front end, steps, events out.

Messages from the front end (over a multiprocessing pipe between our own processes):
  ("add", GenerationRequest, priority)   ("cancel", request_id)   ("stop",)
Messages to the front end:
  ("ready", info)                        once, after loading and a warm-up step
  ("events", [event, ...], stats)        after every step that produced tokens, and as a
                                         heartbeat about once a second when idle
  ("fatal", message, traceback)          before the process dies
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import torch

from shardserve_sharding.models.cpu_gemm import BF16_GEMM_AS_FP32_MIN_ROWS

from ..engine.runner import ForwardPlan, broadcast_plan
from ..engine.sampling import SamplingParams
from ..engine.scheduler import GroupScheduler, SchedulerConfig
from ..engine.sequence import GenerationRequest
from ..engine.stopping import StoppingParams

HEARTBEAT_S = 1.0
log = logging.getLogger("shardserve.leader")


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
        self.last_step: dict[str, float] = {}
        self.tokens_out = 0
        self.sent_stats: dict = {}  # the stats of the last completed step, as last sent
        # followers block in a broadcast between steps; keep it shorter than pg_timeout_s
        self.keepalive_s = min(HEARTBEAT_S, float(getattr(cfg, "pg_timeout_s", 10.0)) / 4)
        self.last_bcast = time.monotonic()

    def _forward(self, plan: ForwardPlan) -> torch.Tensor:
        if self.tp > 1:
            broadcast_plan(plan)
            self.last_bcast = time.monotonic()
        return self.runner.forward(plan)

    def warmup(self) -> float:
        t0 = time.perf_counter()
        # long enough for the fp32 GEMM path of bf16 models, so that its cached fp32 weight
        # copies are built here, before readiness, not on the first request
        prompt = tuple(range(1, BF16_GEMM_AS_FP32_MIN_ROWS + 3))
        req = GenerationRequest(prompt, SamplingParams(temperature=0.0),
                                StoppingParams(max_new_tokens=2, ignore_eos=True), "__warmup__")
        self.scheduler.add(req)
        while self.scheduler.has_work():
            self.scheduler.reap()
            for plan, rows, samples in self.scheduler.schedule():
                self.scheduler.process(self._forward(plan), rows, samples)
            self.scheduler.reap()
        self.scheduler.step_count = 0
        return time.perf_counter() - t0

    def _handle(self, msg: tuple) -> list[dict]:
        kind = msg[0]
        if kind == "add":
            _, req, priority = msg
            try:
                self.scheduler.add(req, priority)
            except ValueError as e:
                return [{"id": req.request_id, "error": str(e)}]
            except Exception as e:  # a request must never take the group down
                log_internal("add", e)
                return [{"id": req.request_id, "error": f"request refused: {e}"}]
        elif kind == "cancel":
            self.scheduler.cancel(msg[1])
        elif kind == "stop":
            self.stopping = True
        return []

    def _drain(self, block: bool) -> list[dict]:
        events: list[dict] = []
        timeout = 0.05 if block else 0.0
        while self.conn.poll(timeout):
            events += self._handle(self.conn.recv())
            timeout = 0.0
        return events

    def stats(self) -> dict:
        s = self.scheduler.stats()
        s.update(
            phase_s=dict(self.phase_s), last_step=dict(self.last_step),
            comm_s=self.runner.comm_seconds, forward_s=self.runner.forward_seconds,
            tokens_out=self.tokens_out,
        )
        return s

    def run(self) -> None:
        warm_s = self.warmup() if self.cfg.warmup else 0.0
        self.sent_stats = self.stats()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.conn.send(("ready", {"load_s": self.load_s, "warmup_s": warm_s, "rss_mb": rss_mb,
                                  "family": self.runner.family}))
        last_sent = time.monotonic()
        while True:
            events = self._drain(block=not self.scheduler.has_work())
            if self.stopping:
                if self.tp > 1:
                    broadcast_plan(ForwardPlan.stop())
                return
            events += self.scheduler.reap()
            if self.scheduler.has_work():
                events += self._step()
            now = time.monotonic()
            if self.tp > 1 and now - self.last_bcast >= self.keepalive_s:
                broadcast_plan(ForwardPlan.keepalive())
                self.last_bcast = now
            if events or now - last_sent >= HEARTBEAT_S:
                self.sent_stats = self.stats()
                self.conn.send(("events", events, self.sent_stats))
                last_sent = now

    def _process(self, logits: torch.Tensor, rows: list, samples: list[bool]) -> list[dict]:
        """Sample a forward's rows; a failure there ends those rows, never the group (the
        forward itself completed, so the cache and every other sequence are intact)."""
        try:
            return self.scheduler.process(logits, rows, samples)
        except Exception as e:
            log_internal("sampling", e)
            return [self.scheduler.fail(s, f"internal error while sampling: "
                                           f"{type(e).__name__}: {e}")
                    for s in rows if not s.seq.finished]

    def _step(self) -> list[dict]:
        events: list[dict] = []
        self.last_step = {}
        comm0 = self.runner.comm_seconds
        t_step = time.perf_counter()
        batch = 0
        plans = self.scheduler.schedule()
        for k, (plan, rows, samples) in enumerate(plans):
            if events and k > 0:  # first tokens of the prefill forward: out before the decode
                # with the last completed step's stats: this step's are not whole yet (the
                # front end counts a step's metrics once, when its step count moves)
                self.conn.send(("events", events, self.sent_stats))
                events = []
            t0 = time.perf_counter()
            logits = self._forward(plan)
            new = self._process(logits, rows, samples)
            # a step with prompt tokens is a prefill step (a flat one carries decodes too)
            decoding = int(plan.num_new.max()) == 1 and all(samples)
            phase = "decode" if decoding else "prefill"
            self.phase_s[phase] += time.perf_counter() - t0
            self.last_step[f"{phase}_s"] = time.perf_counter() - t0
            self.last_step[f"{phase}_rows"] = len(rows)
            self.last_step[f"{phase}_tokens"] = int(plan.num_new.sum())
            batch += len(rows)
            self.tokens_out += len(new)
            events += new
        self.last_step["step_s"] = time.perf_counter() - t_step
        self.last_step["comm_s"] = self.runner.comm_seconds - comm0
        self.last_step["batch"] = batch
        return events
