"""loadtest/replan.py: a validate_plan results file re-predicted offline from its stored
costs (a frozen copy of the quiet-machine file of 2026-12-06 05:55, and damaged copies of it;
not the live loadtest/results/plan_quiet.md, which every validate_plan run replaces)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
sys.path.insert(0, str(LOADTEST))

import replan  # noqa: E402
import server_log  # noqa: E402

QUIET = Path(__file__).resolve().parent / "data" / "plan_quiet_2026-12-06-0555.md"


def test_the_quiet_file_parses_into_its_points_and_costs():
    points, costs, new_tokens = replan.parse(QUIET.read_text(), str(QUIET))
    assert len(points) == 14 and new_tokens == 64
    first = points[0]
    assert (first.config, first.streams) == ("torch-bf16-tp1", 1)
    assert first.measured == {"tok_s": 22.9, "ttft_ms": 105.0, "itl_ms": 43.5}
    assert first.old == {"tok_s": 26.2, "ttft_ms": 75.0, "itl_ms": 37.6}
    assert costs.host_threads == 2 and "bf16" in costs.gemm_flops


def test_main_prints_old_and_new_ratios_for_every_point(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["replan.py", str(QUIET)])
    assert replan.main() == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.split()[:1] and line.split()[0] in replan.CONFIGS]
    assert len(rows) == 14
    assert out[-1].startswith("tok/s and TTFT within 25%: old 22 of 28")


@pytest.mark.parametrize("cut, message", [
    (lambda t: t.replace("```json", "```"), "no costs JSON block"),
    (lambda t: t.replace('"host_threads": 2', '"host_threads": "two"'), "host_threads"),
    (lambda t: t.replace("| torch-bf16-tp1 | 1 | 26.2", "| torch-bf16-tp1 | 1 | x"),
     "bad table row"),
])
def test_a_damaged_file_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, cut, message):
    p = tmp_path / "plan.md"
    p.write_text(cut(QUIET.read_text()))
    monkeypatch.setattr(sys, "argv", ["replan.py", str(p)])
    assert replan.main() == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def _line(end: str, queue: float, ttft: float, total: float) -> str:
    d = {"event": "request", "outcome": "ok", "generated_tokens": 5, "queue_s": queue,
         "ttft_s": ttft, "total_s": total}
    return f"2026-12-06 05:47:{end} INFO shardserve.requests {json.dumps(d)}"


def test_server_log_digest_splits_lone_and_shared_requests():
    """Two requests one after the other (alone), then two that overlap: queueing,
    admission-to-first-token and the mean decode step of each; cancelled ones skipped."""
    log = "\n".join([
        "2026-12-06 05:47:00,000 INFO shardserve.server serving llama",
        _line("01,000", 0.001, 0.101, 1.0),
        _line("02,000", 0.001, 0.121, 1.0),
        _line("04,000", 0.050, 0.350, 1.5),
        _line("04,100", 0.010, 0.210, 1.6),
        '2026-12-06 05:47:05,000 INFO shardserve.requests {"outcome": "cancelled"}',
    ])
    got = server_log.digest_log(log)
    assert got["alone"]["queue"] == [0.001, 0.001]
    assert got["alone"]["first"] == pytest.approx([0.1, 0.12])
    assert got["alone"]["decode"] == pytest.approx([(1.0 - 0.101) / 4, (1.0 - 0.121) / 4])
    assert got["with others"]["first"] == pytest.approx([0.3, 0.2])
    lines = server_log.summary(log)
    assert lines[0].startswith("alone: 2 requests, queue p50 1.0 ms")
    assert lines[-2] == "admission to first token, ms: 200 300"
    assert lines[-1] == "queue, ms: 10 50"
