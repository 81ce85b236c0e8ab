"""Prometheus metrics of the front end and the worker groups (prometheus-client, own registry).

Names follow Prometheus conventions: `shardserve_` prefix, base units (seconds, tokens,
ratio), `_total` for counters. Step-level series are fed from the group leader's stats that
arrive with every step's events; request-level series when a request ends; the inter-token
latency per token as it reaches the front end. A worker group is a replica: every per-group
series is labelled `replica`. Latency and TTFT are labelled by outcome, so cancelled and
timed-out requests are counted too (slow failures are not hidden); requests carry the
`finish_reason` of their result (`none` when they ended without one). The default process,
platform and GC collectors describe the front-end process, worker_processes.py the workers.
The recording and alert rules and the Grafana dashboard over these series are in
`shardserve_server/monitoring/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from .worker_processes import WorkerProcessCollector

if TYPE_CHECKING:
    from ..workers.protocol import GroupStats

OUTCOMES = ("ok", "invalid", "overloaded", "cancelled", "deadline", "error", "unauthenticated")
# outcomes of requests that reached the engine: their latency (and TTFT, if a token came) counts
TIMED_OUTCOMES = ("ok", "cancelled", "deadline", "error")
_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOK = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
        1.0, 2.5, 5.0)


class Metrics:
    """Every series the server exports, in one registry; the servicer and app feed it."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # process_* (RSS, CPU, fds), python_info, python_gc_*
        self._worker_pids: tuple[tuple[int, int, int], ...] = ()
        r.register(WorkerProcessCollector(lambda: self._worker_pids))
        self.build_info = Info("shardserve_build", "Server version and runtime", registry=r)
        self.model_info = Info("shardserve_model", "The served model and its layout", registry=r)
        self.requests = Counter("shardserve_requests", "Requests by outcome and finish reason",
                                ["method", "outcome", "finish_reason"], registry=r)
        self.request_duration = Histogram(
            "shardserve_request_duration_seconds",
            "Submission to completion (cancelled / timed out: to when the server noticed)",
            ["outcome"], buckets=_LAT, registry=r)
        self.queue_time = Histogram(
            "shardserve_request_queue_seconds", "Submission to admission into a running batch",
            buckets=_LAT, registry=r)
        self.ttft = Histogram(
            "shardserve_time_to_first_token_seconds", "Submission to first generated token",
            ["outcome"], buckets=_LAT, registry=r)
        self.tpot = Histogram(
            "shardserve_time_per_output_token_seconds", "Mean inter-token time of a request",
            buckets=_STEP, registry=r)
        self.itl = Histogram(
            "shardserve_inter_token_latency_seconds",
            "Time between two consecutive tokens of a request, one observation per token",
            buckets=_ITL, registry=r)
        self.prompt_tokens = Counter("shardserve_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generated_tokens = Counter("shardserve_generated_tokens", "Tokens generated",
                                        registry=r)
        self.request_prompt_tokens = Histogram(
            "shardserve_request_prompt_tokens", "Prompt tokens per request", buckets=_TOK,
            registry=r)
        self.request_generated_tokens = Histogram(
            "shardserve_request_generated_tokens", "Generated tokens per request", buckets=_TOK,
            registry=r)
        self.batch_size = Histogram("shardserve_batch_size", "Sequences per step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("shardserve_batch_tokens", "Tokens computed per step",
                                      buckets=_TOK, registry=r)
        self.step_duration = Histogram(
            "shardserve_step_duration_seconds", "Forward + sampling time per step phase",
            ["phase"], buckets=_STEP, registry=r)
        self.allreduce = Histogram(
            "shardserve_allreduce_seconds", "Time in TP collectives per step (TP > 1)",
            buckets=_STEP, registry=r)
        self.queue_depth = Gauge("shardserve_queue_depth", "Requests waiting for a group",
                                 registry=r)
        self.queue_capacity = Gauge("shardserve_queue_capacity_requests",
                                    "Requests the waiting queue holds before refusing",
                                    registry=r)
        self.queued_tokens = Gauge("shardserve_queued_prompt_tokens",
                                   "Prompt tokens of the requests waiting for a group", registry=r)
        self.queued_tokens_capacity = Gauge(
            "shardserve_queued_prompt_tokens_capacity",
            "Prompt tokens the waiting queue holds before refusing", registry=r)
        self.reserved_tokens = Gauge(
            "shardserve_kv_cache_reserved_tokens",
            "KV-cache tokens reserved by admitted requests (worst case: prompt + max_new_tokens)",
            ["replica"], registry=r)
        self.kv_capacity = Gauge("shardserve_kv_cache_capacity_tokens",
                                 "KV-cache tokens of each replica", ["replica"], registry=r)
        self.replica_kv_usage = Gauge("shardserve_replica_kv_cache_usage_ratio",
                                      "Used / total KV blocks per replica", ["replica"],
                                      registry=r)
        self.running = Gauge("shardserve_running_requests", "Requests in running batches",
                             registry=r)
        self.kv_usage = Gauge("shardserve_kv_cache_usage_ratio", "Used / total KV blocks",
                              registry=r)
        self.group_up = Gauge("shardserve_worker_group_up", "1 when the worker group serves",
                              ["replica"], registry=r)
        self.restarts = Counter("shardserve_worker_group_restarts", "Worker group restarts",
                                ["replica"], registry=r)
        self._last_steps: dict[int, int] = {}
        self._restarts_seen: dict[int, int] = {}
        self.replica_tokens = Counter("shardserve_replica_generated_tokens",
                                      "Tokens generated per replica", ["replica"], registry=r)
        self.replica_inflight = Gauge("shardserve_replica_inflight_requests",
                                      "Requests handed to each replica", ["replica"], registry=r)
        self._tokens_seen: dict[int, int] = {}
        self.prefix_queries = Counter(
            "shardserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache at "
            "admission", ["replica"], registry=r)
        self.prefix_hits = Counter(
            "shardserve_prefix_cache_hits", "Prompt tokens found in the prefix cache (their "
            "prefill skipped)", ["replica"], registry=r)
        self._prefix_seen: dict[tuple[str, int], int] = {}
        # where a layout's step time goes (issue 20: is it communication-bound?)
        self.replica_forward_seconds = Counter(
            "shardserve_replica_forward_seconds", "Time in the model's forward per replica "
            "(collectives included; the warm-up step too)",
            ["replica"], registry=r)
        self.replica_comm_seconds = Counter(
            "shardserve_replica_comm_seconds", "Time in TP collectives inside steps per replica",
            ["replica"], registry=r)
        self.comm_share = Gauge(
            "shardserve_replica_comm_share_ratio", "Share of step time in TP collectives per "
            "replica, over about the last 20 steps (0 at TP 1)", ["replica"], registry=r)
        self.load_imbalance = Gauge(
            "shardserve_replica_load_imbalance_ratio", "Most loaded replica's in-flight requests "
            "over the mean of the serving replicas (1: balanced; 0: idle)", registry=r)
        self._step_totals: dict[int, tuple[float, float]] = {}
        self._share: dict[int, float] = {}
        self._block_size = 0
        for o in OUTCOMES:  # export zeros so every outcome series exists from the start
            self.requests.labels("Generate", o, "none")

    def describe(self, *, version: str, model: dict[str, str], max_queued_requests: int,
                 max_queued_tokens: int, block_size: int) -> None:
        """Set the info series and the fixed capacities (once, at start)."""
        import platform

        self.build_info.info({"version": version, "python": platform.python_version()})
        self.model_info.info({k: str(v) for k, v in model.items()})
        self.queue_capacity.set(max_queued_requests)
        self.queued_tokens_capacity.set(max_queued_tokens)
        self._block_size = block_size

    def count(self, method: str, outcome: str, finish_reason: str = "none") -> None:
        """Count a request that ended (finish_reason `none`: it ended without a result)."""
        self.requests.labels(method, outcome, finish_reason).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def on_step_stats(self, stats: GroupStats, tp: int, replica: int = 0) -> None:
        """Observe a replica's last step, once per step (a heartbeat repeats the stats)."""
        if stats.steps == self._last_steps.get(replica):
            return
        self._last_steps[replica] = stats.steps
        self._observe_comm(stats, replica)
        last = stats.last_step
        if last is None or not last.batch:
            return
        self.batch_size.observe(last.batch)
        self.batch_tokens.observe(last.decode_tokens + last.prefill_tokens)
        if last.prefill_s is not None:
            self.step_duration.labels("prefill").observe(last.prefill_s)
        if last.decode_s is not None:
            self.step_duration.labels("decode").observe(last.decode_s)
        if tp > 1:
            self.allreduce.observe(last.comm_s)

    def _observe_comm(self, stats: GroupStats, replica: int) -> None:
        """Feed the per-replica forward and collective counters from the group's running
        totals (a restarted group counts from 0 again) and move the comm share towards the
        share of the steps since the last stats (weight 1/20). Both totals are the runner's,
        warm-up included, so their ratio is never skewed by one side counting it."""
        label = str(replica)
        step_total = stats.forward_s_total
        prev_step, prev_comm = self._step_totals.get(replica, (0.0, 0.0))
        if step_total < prev_step or stats.comm_s_total < prev_comm:
            prev_step = prev_comm = 0.0  # a new group
        d_step, d_comm = step_total - prev_step, stats.comm_s_total - prev_comm
        self._step_totals[replica] = (step_total, stats.comm_s_total)
        self.replica_forward_seconds.labels(label).inc(d_step)
        self.replica_comm_seconds.labels(label).inc(d_comm)
        if d_step > 0:
            share = min(1.0, d_comm / d_step)
            old = self._share.get(replica)
            self._share[replica] = share if old is None else old + 0.05 * (share - old)
            self.comm_share.labels(label).set(self._share[replica])

    def on_token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_engine_stats(self, s: dict[str, Any]) -> None:
        self.queue_depth.set(s["queue_depth"])
        self.queued_tokens.set(s.get("queued_tokens", 0))
        self.running.set(s["running"])
        self.kv_usage.set(s["kv_usage"])
        self._worker_pids = tuple((rep["replica"], rank, pid) for rep in s["replicas"]
                                  for rank, pid in enumerate(rep.get("pids", ())))
        up = [rep["inflight"] for rep in s["replicas"] if rep["up"]]
        mean = sum(up) / len(up) if up else 0.0
        self.load_imbalance.set(max(up) / mean if mean > 0 else 0.0)
        for rep in s["replicas"]:
            i = rep["replica"]
            label = str(i)
            self.replica_forward_seconds.labels(label)  # export the series at 0 from the start
            self.replica_comm_seconds.labels(label)
            self.comm_share.labels(label)
            self.group_up.labels(label).set(1 if rep["up"] else 0)
            self.replica_inflight.labels(label).set(rep["inflight"])
            self.replica_kv_usage.labels(label).set(rep.get("kv_usage", 0.0))
            self.reserved_tokens.labels(label).set(rep.get("reserved_tokens", 0))
            if rep.get("kv_total_blocks"):
                self.kv_capacity.labels(label).set(rep["kv_total_blocks"] * self._block_size)
            seen = self._restarts_seen.get(i, 0)
            self.restarts.labels(label)  # export the series at 0 from the start
            self.replica_tokens.labels(label)
            if rep["restarts"] > seen:
                self.restarts.labels(label).inc(rep["restarts"] - seen)
                self._restarts_seen[i] = rep["restarts"]
            tok = rep["tokens_out"]
            prev = self._tokens_seen.get(i, 0)
            if tok != prev:  # a smaller count: the group restarted and counts from 0 again
                self.replica_tokens.labels(label).inc(tok - prev if tok > prev else tok)
            self._tokens_seen[i] = tok
            for key, counter in (("prefix_cache_queries", self.prefix_queries),
                                 ("prefix_cache_hits", self.prefix_hits)):
                counter.labels(label)  # export the series at 0 from the start
                now, prev = rep.get(key, 0), self._prefix_seen.get((key, i), 0)
                if now != prev:  # a smaller count: the group restarted and counts from 0 again
                    counter.labels(label).inc(now - prev if now > prev else now)
                self._prefix_seen[(key, i)] = now

    def on_request_done(self, method: str, outcome: str, *, finish_reason: str = "none",
                        prompt_tokens: int = 0, generated: int = 0,
                        timing: dict | None = None, elapsed_s: float | None = None) -> None:
        """Account a request that ended. `timing` (queue_s, ttft_s, total_s) comes from its
        stream; `elapsed_s` is its age when it ended without finishing (cancel, deadline)."""
        self.count(method, outcome, finish_reason)
        if outcome not in TIMED_OUTCOMES:
            return
        t = timing or {}
        total = t.get("total_s")
        if total is None:
            total = elapsed_s
        if total is not None:
            self.request_duration.labels(outcome).observe(total)
        if t.get("ttft_s") is not None:
            self.ttft.labels(outcome).observe(t["ttft_s"])
        if prompt_tokens or generated:
            self.prompt_tokens.inc(prompt_tokens)
            self.generated_tokens.inc(generated)
        if outcome != "ok":
            return
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generated_tokens.observe(generated)
        if t.get("queue_s") is not None:
            self.queue_time.observe(t["queue_s"])
        if t.get("ttft_s") is not None and generated > 1 and t.get("total_s") is not None:
            self.tpot.observe((t["total_s"] - t["ttft_s"]) / (generated - 1))
