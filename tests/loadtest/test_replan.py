"""loadtest/replan.py: a validate_plan results file re-predicted offline from its stored
costs (the committed quiet-machine file, and damaged copies of it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
sys.path.insert(0, str(LOADTEST))

import replan  # noqa: E402

QUIET = LOADTEST / "results" / "plan_quiet.md"


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
