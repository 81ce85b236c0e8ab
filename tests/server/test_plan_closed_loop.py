"""plan/closed_loop.py: equal-length closed-loop streams on one replica, replayed step by step
with the group leader's rules, on hand-made step costs (no timing anywhere)."""

from __future__ import annotations

import pytest

from shardserve_server.plan import closed_loop


class Steps:
    """A step cost that records each forward: (tokens, rows, sampled) -> tokens ms + 10 ms."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, tokens: int, rows: int, ctx: float, sampled: int) -> float:
        self.calls.append((tokens, rows, sampled))
        return 1e-3 * tokens + 0.01


def test_an_idle_leader_starts_with_the_first_request_alone():
    """4 requests sent together reach the leader one after another: the first is prefilled
    alone, the other three in the next step beside its decode, chunked to the budget (15)
    less the step's decode rows, as the scheduler does in a flat step: 10 + 4 prompt tokens
    beside one decode, then 6 + 7 beside two. (The old model prefilled all four prompts in
    one step.)"""
    cost = Steps()
    closed_loop.run(cost, streams=4, prompt=10, new=3, budget=15, front_s=0.002, flat=True,
                    rounds=1, skip_rounds=0)
    assert cost.calls[:3] == [
        (10, 1, 1),  # request 0's prompt, alone
        (1 + 14, 3, 2),  # request 0 decodes; request 1 whole (first token), 4 of request 2
        (2 + 13, 4, 3),  # 0 and 1 decode; the rest of 2 (first token), 7 of 3
    ]


def _ttfts(phase: int, flat: bool = True) -> list[float]:
    """The TTFTs of the last of 3 rounds of 4 streams (10-token prompts, 4 new tokens, 2 ms
    front end), smallest first."""
    got: list[float] = []
    orig = closed_loop._measure

    def keep(done, skip):
        got.extend(sorted(r.tokens[0] - r.sent for r in sorted(done, key=lambda r: r.sent)[-4:]))
        return orig(done, skip)

    closed_loop._measure = keep
    try:
        closed_loop.run(Steps(), streams=4, prompt=10, new=4, budget=512, front_s=0.002,
                        flat=flat, rounds=3, skip_rounds=1, phase=phase)
    finally:
        closed_loop._measure = orig
    return got


def step(tokens: int) -> float:
    return 1e-3 * tokens + 0.01


def test_phase_one_the_others_wait_for_the_first_ones_prompt_step():
    """Steady phase 1: the request one step ahead finishes a step early, waits for the
    others' last decode step, is prefilled alone; the others, sent as that step starts, wait
    for all of it, then share a step of their 3 prompts and its decode."""
    ttfts = _ttfts(1)
    ahead = 0.002 + (step(3) - 0.002) + step(10)  # front, the rest of the step, its prompt
    rest = step(10) - 0.002 + step(30 + 1) + 0.002  # its prompt step, then theirs
    assert ttfts == pytest.approx([ahead, rest, rest, rest])


def test_phase_two_the_others_wait_one_decode_step():
    """Steady phase 2 (the first request two steps ahead, as after any split of the group):
    its prompt step is the others' last decode step, and their requests wait only for its
    first decode step (1 row), not a prompt step."""
    ttfts = _ttfts(2)
    ahead = 0.002 + (step(3) - 0.002) + step(10 + 3)  # waits a 3-row decode; prompt + 3 rows
    rest = step(1) - 0.002 + step(30 + 1) + 0.002
    assert ttfts == pytest.approx([ahead, rest, rest, rest])


def test_onnx_first_tokens_leave_before_the_decode_forward():
    """Without flat batches a step is a prefill forward, whose first tokens are flushed at
    once, then a decode forward: the three prompts' TTFT holds no decode forward of theirs."""
    ttfts = _ttfts(1, flat=False)
    rest = step(10) - 0.002 + step(30) + 0.002  # its prompt forward, then theirs
    assert ttfts[1:] == pytest.approx([rest] * 3)
    assert _ttfts(1)[1:] == pytest.approx([rest + step(31) - step(30)] * 3)  # flat: one step


def test_the_plan_reports_the_mean_of_both_phases():
    kw = dict(streams=4, prompt=10, new=4, max_prefill_tokens=512, front_s=0.002, rounds=4,
              skip_rounds=1)
    both = closed_loop.simulate(Steps(), **kw)
    runs = [closed_loop.run(Steps(), streams=4, prompt=10, new=4, budget=512, front_s=0.002,
                            flat=True, rounds=4, skip_rounds=1, phase=ph) for ph in (1, 2)]
    assert runs[0].ttft_p50_s > runs[1].ttft_p50_s
    assert both.ttft_p50_s == pytest.approx((runs[0].ttft_p50_s + runs[1].ttft_p50_s) / 2)
    assert both.tok_s == pytest.approx((runs[0].tok_s + runs[1].tok_s) / 2)
    # one stream has one phase: its TTFT is the front end's share and one prompt step
    one = closed_loop.simulate(Steps(), **{**kw, "streams": 1})
    assert one.ttft_p50_s == pytest.approx(0.002 + step(10))
    assert one.itl_p50_s == pytest.approx(step(1))


def test_bad_arguments():
    with pytest.raises(ValueError):
        closed_loop.simulate(Steps(), streams=0, prompt=10, new=4, max_prefill_tokens=16,
                             front_s=0.0)
