"""loadtest/step_trace.py reads what the group leader writes under SHARDSERVE_STEP_TRACE."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import step_trace  # noqa: E402

from shardserve_server.workers.leader import _open_trace, trace_line  # noqa: E402
from shardserve_server.workers.protocol import StepTiming  # noqa: E402


def test_leader_trace_lines_parse_and_summarize():
    steps = [StepTiming(step_s=0.1, prefill_s=0.1, prefill_rows=30, prefill_tokens=512,
                        batch=30)]
    steps += [StepTiming(step_s=0.02, decode_s=0.02, decode_rows=32, decode_tokens=32,
                         batch=32)] * 9
    now, text = 100.0, ""
    for st in steps:
        now += st.step_s + 0.001  # 1 ms between steps
        text += trace_line(now, st)
    parsed = step_trace.parse(text + "123.0 0.1\n")  # a line cut short is skipped
    assert len(parsed) == 10
    assert parsed[0].prompt_tokens == 512 and parsed[0].prefill_rows == 30
    assert parsed[1].decode_rows == 32 and abs(parsed[1].decode_s - 0.02) < 1e-9
    out = step_trace.summarize(parsed, skip=0.0)
    assert "decode-only: 9 steps, mean 20.0 ms, 32.0 rows" in out
    assert "with prompt tokens: 1 steps, mean 100.0 ms, 512 tokens" in out
    # 30 + 9 * 32 tokens over 0.28 s of steps and 9 ms between them
    assert "between steps 0.01 s" in out and "~1100.3 tokens/s" in out


def test_steps_of_two_forwards_count_both():
    """An engine without flat steps runs a prompt forward and a decode forward in one step:
    both forwards' rows count (30 prompt rows + 2 decode rows over 0.1 s)."""
    st = StepTiming(step_s=0.1, prefill_s=0.06, prefill_rows=30, prefill_tokens=300,
                    decode_s=0.04, decode_rows=2, decode_tokens=2, batch=32)
    steps = step_trace.parse(trace_line(10.1, st))
    assert "~320.0 tokens/s" in step_trace.summarize(steps, skip=0.0)


def test_the_trace_file_is_per_leader_and_optional(tmp_path):
    f = _open_trace(str(tmp_path / "t"))
    try:
        f.write("x\n")
    finally:
        f.close()
    (written,) = tmp_path.iterdir()
    assert written.name.startswith("t.") and written.name[2:].isdigit()  # t.<pid>
    assert _open_trace(str(tmp_path / "missing-dir" / "t")) is None  # one warning, no trace
    assert _open_trace(None) is None and _open_trace("") is None
