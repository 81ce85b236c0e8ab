"""Prometheus metrics of the front end and the worker groups (prometheus-client, own registry).

Names follow Prometheus conventions: `shardserve_` prefix, base units (seconds, tokens,
ratio), `_total` for counters. Step-level series are fed from the group leader's stats that
arrive with every step's events; request-level series when a request ends.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OUTCOMES = ("ok", "invalid", "overloaded", "cancelled", "deadline", "error", "unauthenticated")
_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOK = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("shardserve_requests", "Requests by outcome", ["method", "outcome"],
                                registry=r)
        self.request_duration = Histogram(
            "shardserve_request_duration_seconds", "Submission to completion", buckets=_LAT,
            registry=r)
        self.queue_time = Histogram(
            "shardserve_request_queue_seconds", "Submission to admission into a running batch",
            buckets=_LAT, registry=r)
        self.ttft = Histogram(
            "shardserve_time_to_first_token_seconds", "Submission to first generated token",
            buckets=_LAT, registry=r)
        self.tpot = Histogram(
            "shardserve_time_per_output_token_seconds", "Mean inter-token time of a request",
            buckets=_STEP, registry=r)
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
        self.running = Gauge("shardserve_running_requests", "Requests in running batches",
                             registry=r)
        self.kv_usage = Gauge("shardserve_kv_cache_usage_ratio", "Used / total KV blocks",
                              registry=r)
        self.group_up = Gauge("shardserve_worker_group_up", "1 when the worker group serves",
                              ["group"], registry=r)
        self.restarts = Counter("shardserve_worker_group_restarts", "Worker group restarts",
                                ["group"], registry=r)
        self._last_steps: dict[int, int] = {}
        self._restarts_seen: dict[int, int] = {}
        self.replica_tokens = Counter("shardserve_replica_generated_tokens",
                                      "Tokens generated per replica", ["replica"], registry=r)
        self.replica_inflight = Gauge("shardserve_replica_inflight_requests",
                                      "Requests handed to each replica", ["replica"], registry=r)
        self._tokens_seen: dict[int, int] = {}
        for o in OUTCOMES:  # export zeros so every outcome series exists from the start
            self.requests.labels("Generate", o)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def on_step_stats(self, stats: dict[str, Any], tp: int, replica: int = 0) -> None:
        steps = stats.get("steps", 0)
        if steps == self._last_steps.get(replica):
            return
        self._last_steps[replica] = steps
        last = stats.get("last_step") or {}
        if "batch" not in last:
            return
        self.batch_size.observe(last["batch"])
        tokens = last.get("decode_tokens", 0) + last.get("prefill_tokens", 0)
        self.batch_tokens.observe(tokens)
        for phase in ("prefill", "decode"):
            if f"{phase}_s" in last:
                self.step_duration.labels(phase).observe(last[f"{phase}_s"])
        if tp > 1:
            self.allreduce.observe(last.get("comm_s", 0.0))

    def on_engine_stats(self, s: dict[str, Any]) -> None:
        self.queue_depth.set(s["queue_depth"])
        self.running.set(s["running"])
        self.kv_usage.set(s["kv_usage"])
        for rep in s["replicas"]:
            i = rep["replica"]
            label = str(i)
            self.group_up.labels(label).set(1 if rep["up"] else 0)
            self.replica_inflight.labels(label).set(rep["inflight"])
            seen = self._restarts_seen.get(i, 0)
            self.restarts.labels(label)  # export the series at 0 from the start
            self.replica_tokens.labels(label)
            if rep["restarts"] > seen:
                self.restarts.labels(label).inc(rep["restarts"] - seen)
                self._restarts_seen[i] = rep["restarts"]
            tok = rep["tokens_out"]
            prev = self._tokens_seen.get(i, 0)
            if tok > prev:
                self.replica_tokens.labels(label).inc(tok - prev)
            self._tokens_seen[i] = tok

    def on_request_done(self, method: str, outcome: str, *, prompt_tokens: int = 0,
                        generated: int = 0, timing: dict | None = None) -> None:
        self.requests.labels(method, outcome).inc()
        if outcome != "ok":
            return
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generated_tokens.observe(generated)
        t = timing or {}
        if t.get("total_s") is not None:
            self.request_duration.observe(t["total_s"])
        if t.get("queue_s") is not None:
            self.queue_time.observe(t["queue_s"])
        if t.get("ttft_s") is not None:
            self.ttft.observe(t["ttft_s"])
            if generated > 1 and t.get("total_s") is not None:
                self.tpot.observe((t["total_s"] - t["ttft_s"]) / (generated - 1))
