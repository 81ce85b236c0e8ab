"""The monitoring assets that ship with the server: the rules pass `promtool check rules` and
their `promtool test rules` unit tests; the Grafana dashboard is import-ready with the data
source as a variable; every metric named in the dashboard's and the rules' expressions is
exported by a real server (or is a recording rule the rules define); and the new series move."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from grpc_servers import SLOW_DEADLINE_S, SLOW_STEPS, RunningServer, poll
from prometheus_client.parser import text_string_to_metric_families

from shardserve_client import DeadlineExceeded, InvalidArgument
from shardserve_server.monitoring import dashboard_path, rules_path

HERE = Path(__file__).resolve().parent
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; .ci/setup)")
# made by Prometheus itself, not by the server
SYNTHETIC = {"up", "ALERTS", "ALERTS_FOR_STATE"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "le"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or a by/without/on/ignoring list), durations or strings."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                          # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                         # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def test_promql_name_parser():
    got = promql_metric_names(
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="y", le="+Inf"}[5m]))) > 2'
        ' and on (job) (b + sum without (instance) (c:rec:rate1m)) unless d offset 5m')
    assert got == {"a_bucket", "b", "c:rec:rate1m", "d"}
    assert promql_metric_names("rate(x_total[$__rate_interval]) * 1e3 / scalar(y)") == {
        "x_total", "y"}


def rule_exprs() -> tuple[list[str], set[str]]:
    doc = yaml.safe_load(rules_path().read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    return [r["expr"] for r in rules], {r["record"] for r in rules if "record" in r}


def dashboard_exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


@needs_promtool
def test_rules_pass_promtool_check_and_unit_tests():
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules_path())],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "monitoring_rules_test.yml"], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_rules_cover_what_an_operator_needs():
    doc = yaml.safe_load(rules_path().read_text())
    names = {r.get("record") or r.get("alert") for g in doc["groups"] for r in g["rules"]}
    assert {"shardserve:requests:rate1m", "shardserve:generated_tokens:rate1m",
            "shardserve:time_to_first_token_seconds:p99_1m",
            "shardserve:inter_token_latency_seconds:p99_1m",
            "shardserve:request_duration_seconds:p99_1m", "shardserve:queue_depth:sum",
            "shardserve:kv_cache_usage_ratio:max", "ShardserveHighTimeToFirstToken",
            "ShardserveKVCacheFull", "ShardserveQueueFull", "ShardserveRejectingRequests",
            "ShardserveWorkerGroupDown", "ShardserveWorkerGroupRestarting",
            "ShardserveNoTokensWhileRequestsWait"} <= names
    for g in doc["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert r["labels"]["severity"] in ("warning", "critical")
                assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_dashboard_is_import_ready_with_a_datasource_variable():
    dash = json.loads(dashboard_path().read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dash["id"] is None and dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("tokens / s", "time to first token", "inter-token", "end-to-end", "queue",
                 "kv-cache", "step duration by phase", "batch size", "all-reduce",
                 "per-replica", "worker groups", "memory", "cpu"):
        assert want in titles, want


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    s = RunningServer(tiny_llama_dir, "--dtype", "fp32", "--max-batch-size", "4",
                      "--kv-cache-tokens", "2048", prefix=SLOW_STEPS)  # deadlines land mid-request
    yield s
    assert s.stop() == 0


def _exercise(server) -> None:
    """A finished stream, a finished chat, a cancelled stream, an invalid request and one
    past its deadline."""
    with server.client() as c:
        list(c.generate_stream("the quick brown fox", max_new_tokens=6, ignore_eos=True))
        c.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, ignore_eos=True)
        stream = c.generate_stream("hello", max_new_tokens=400, ignore_eos=True)
        next(stream)
        stream.close()
        with pytest.raises(InvalidArgument):
            c.generate("x", temperature=-1.0)
        with pytest.raises(DeadlineExceeded):
            c.generate("hello", max_new_tokens=400, ignore_eos=True, timeout=SLOW_DEADLINE_S)



def test_every_metric_in_dashboard_and_rules_is_exported(server):
    _exercise(server)
    assert poll(lambda: server.metric("shardserve_requests_total", 'outcome="cancelled"') >= 1)
    assert poll(lambda: "shardserve_worker_cpu_seconds_total{" in server.metrics())
    samples = {s.name for fam in text_string_to_metric_families(server.metrics())
               for s in fam.samples}
    rule_list, recorded = rule_exprs()
    exprs = rule_list + dashboard_exprs(json.loads(dashboard_path().read_text()))
    names = set().union(*(promql_metric_names(e) for e in exprs))
    assert len(names) > 20
    missing = {n for n in names - SYNTHETIC
               if n not in samples and not (":" in n and n in recorded)}
    assert not missing, f"named in the dashboard or rules, not exported: {sorted(missing)}"


def test_new_series_move(server):
    _exercise(server)
    m = server.metric
    assert poll(lambda: m("shardserve_requests_total", 'finish_reason="max_tokens"') >= 2)
    assert m("shardserve_requests_total", 'outcome="invalid"') >= 1
    # latency and TTFT of cancelled requests are recorded, labelled by outcome
    assert m("shardserve_request_duration_seconds_count", 'outcome="cancelled"') >= 1
    assert m("shardserve_time_to_first_token_seconds_count", 'outcome="cancelled"') >= 1
    assert poll(lambda: m("shardserve_request_duration_seconds_count", 'outcome="deadline"') >= 1)
    assert m("shardserve_request_duration_seconds_count", 'outcome="ok"') >= 2
    # one ITL observation per token after the first: the 6-token stream alone gives 5
    assert m("shardserve_inter_token_latency_seconds_count") >= 5
    assert m("shardserve_kv_cache_capacity_tokens", 'replica="0"') == 2048
    assert m("shardserve_queue_capacity_requests") == 256
    assert m("shardserve_model_info", 'family="llama"') == 1
    assert m("shardserve_build_info") == 1
    assert m("process_resident_memory_bytes") > 0 and m("python_gc_collections_total") > 0
    # every worker process (one here: TP=1) by replica and rank
    assert m("shardserve_worker_resident_memory_bytes", 'rank="0",replica="0"') > 50e6
    assert m("shardserve_worker_cpu_seconds_total", 'rank="0",replica="0"') > 0
    text = server.metrics()
    for name in ("shardserve_worker_group_up", "shardserve_worker_group_restarts_total",
                 "shardserve_replica_inflight_requests", "shardserve_kv_cache_reserved_tokens",
                 "shardserve_replica_kv_cache_usage_ratio",
                 "shardserve_replica_generated_tokens_total"):
        lines = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
        assert lines and all('replica="0"' in ln for ln in lines), name


def test_comm_share_and_imbalance_arithmetic():
    """The per-replica forward/comm counters follow the group's running totals (a restarted
    group starts again from 0); the comm share moves towards each new window's share; the
    imbalance is the busiest serving replica's in-flight count over the mean."""
    from shardserve_server.api.metrics import Metrics
    from shardserve_server.workers.protocol import GroupStats, StepTiming

    m = Metrics()
    step = StepTiming(step_s=0.1, comm_s=0.04, batch=1, decode_s=0.1, decode_rows=1,
                      decode_tokens=1)
    m.on_step_stats(GroupStats(steps=1, forward_s_total=1.0, comm_s_total=0.4,
                               last_step=step), tp=2, replica=1)
    val = m.registry.get_sample_value
    assert val("shardserve_replica_forward_seconds_total", {"replica": "1"}) == pytest.approx(1.0)
    assert val("shardserve_replica_comm_seconds_total", {"replica": "1"}) == pytest.approx(0.4)
    assert val("shardserve_replica_comm_share_ratio", {"replica": "1"}) == pytest.approx(0.4)
    m.on_step_stats(GroupStats(steps=2, forward_s_total=2.0, comm_s_total=0.4,
                               last_step=step), tp=2, replica=1)  # a window with no comm
    assert val("shardserve_replica_comm_share_ratio", {"replica": "1"}) == pytest.approx(0.38)
    m.on_step_stats(GroupStats(steps=1, forward_s_total=0.5, comm_s_total=0.5,
                               last_step=step), tp=2, replica=1)  # restarted group
    assert val("shardserve_replica_forward_seconds_total", {"replica": "1"}) == pytest.approx(2.5)
    assert val("shardserve_replica_comm_seconds_total", {"replica": "1"}) == pytest.approx(0.9)
    reps = [{"replica": i, "up": up, "inflight": n, "restarts": 0, "tokens_out": 0}
            for i, (up, n) in enumerate([(True, 3), (True, 1), (False, 9)])]
    m.on_engine_stats({"queue_depth": 0, "running": 4, "kv_usage": 0.0, "replicas": reps})
    assert val("shardserve_replica_load_imbalance_ratio") == pytest.approx(1.5)
    for r in reps:
        r["inflight"] = 0
    m.on_engine_stats({"queue_depth": 0, "running": 0, "kv_usage": 0.0, "replicas": reps})
    assert val("shardserve_replica_load_imbalance_ratio") == 0.0


@pytest.mark.slow
def test_comm_share_and_imbalance_from_a_tp2_x2_server(tiny_llama_dir):
    """A real TP=2 x 2-replica server: each replica's collectives show up as a share of its
    step time, and uneven load (3 streams over 2 replicas) as an imbalance above 1."""
    import threading

    s = RunningServer(tiny_llama_dir, "--tp", "2", "--replicas", "2", "--threads", "1",
                      "--kv-cache-tokens", "2048", prefix=SLOW_STEPS)  # in flight >= 3 s
    try:
        def stream() -> None:
            with s.client() as c:
                list(c.generate_stream("the quick brown fox", max_new_tokens=300,
                                       ignore_eos=True))

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        assert poll(lambda: s.metric("shardserve_replica_load_imbalance_ratio") > 1.0, 60)
        for t in threads:
            t.join(120)
        for rep in ("0", "1"):
            label = f'replica="{rep}"'
            assert s.metric("shardserve_replica_comm_seconds_total", label) > 0
            step = s.metric("shardserve_replica_forward_seconds_total", label)
            assert step > s.metric("shardserve_replica_comm_seconds_total", label)
            assert 0 < s.metric("shardserve_replica_comm_share_ratio", label) < 1
    finally:
        assert s.stop() == 0
