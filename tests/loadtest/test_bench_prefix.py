"""The prefix-cache benchmark's own parts (no server): its two workloads have the shapes they
claim (one shared ~1,000-token system prompt vs prompts that differ from their first block),
and its report states the issue's targets from the runs it was given."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "server"))

import bench_prefix as bp  # noqa: E402
from serving_models import tokenizer  # noqa: E402
from stream_stats import WindowStats  # noqa: E402


def test_shared_and_unique_workloads():
    tok = tokenizer()
    shared, unique = bp.prompts(tok, 6, True), bp.prompts(tok, 6, False)
    ids = [tok.encode(p) for p in shared]
    system = len(tok.encode(bp.system_prompt(tok)))
    assert 900 <= system <= 1000
    common = min(len(i) for i in ids)
    for k in range(common):
        if len({i[k] for i in ids}) > 1:
            break
    assert k >= system - 2  # the requests agree on the whole system prompt
    assert len(set(shared)) == 6
    uids = [tok.encode(p) for p in unique]
    assert len({tuple(i[:8]) for i in uids}) == 6  # their first KV block differs
    assert abs(len(uids[0]) - len(ids[0])) < 40


def _st(ttft: float, tok_s: float) -> WindowStats:
    return WindowStats(tok_s=tok_s, ttft_p50=ttft, ttft_p99=ttft * 1.5, itl_p50=0.05,
                       n_ttft=10, completed=10, wrong_length=0, counted_s=30.0)


def test_report_states_the_targets():
    runs = [(0, "on", "shared", _st(0.2, 100.0), 1.0), (0, "off", "shared", _st(1.0, 40.0), 1.0),
            (0, "on", "unique", _st(2.0, 30.0), 1.0), (0, "off", "unique", _st(2.0, 30.6), 3.5)]
    args = argparse.Namespace(note="", streams=16, new_tokens=8, seconds=60.0,
                              warmup_seconds=10.0, repeats=1, versions={},
                              shardserve_args="--kv-cache-tokens 32768", prompt_tokens={})
    text = "\n".join(bp.report(runs, args, "cmd", 60.0))
    assert "TTFT p50 cache off / on = 5.00x (target >= 3x: met)" in text
    assert "tok/s cache on / off = 0.980 (target within 3%: met)" in text
    assert "vs vLLM: not run here" in text
    assert "1 of 4 windows saw a load average above" in text
