"""Closed-loop streams of equal length on one replica, step by step (plan --in-phase).

Streams of equal length (a benchmark with EOS ignored) finish in the same step and send their
next requests together. What happens then is decided by how our group leader takes work
(workers/leader.py): it blocks only while it has nothing to do, and it starts a step as soon
as it has work, with what is already in its pipe. The front end hands requests over one after
another, so:

- An idle leader starts a step with the FIRST request alone; the others arrive during that
  step and are prefilled together in the next (chunked to max_prefill_tokens, less the
  step's decode rows in a flat step, as the scheduler does), beside the
  first one's decode. That one is then a step ahead of the rest: it finishes a step earlier,
  its next request waits for the others' last decode step and is prefilled alone in the step
  after (the others' requests, sent when that step starts, wait for it), and so on: phase 1,
  where the others' TTFT holds one prompt step of waiting.
- A busy leader takes, at each step's start, what has arrived; a request sent when its
  stream's previous one ended reaches it `front_s` later (the front end's share of a TTFT).
  So a stream that got two steps ahead once (a request that caught a step's start, or
  arrivals split otherwise) stays two steps ahead: its prompt step is the others' last decode
  step, and their next requests wait only for its first decode step: phase 2.
  Both phases are stable and which one a run is in depends on its history. The server logs
  behind results/plan_quiet.md (2026-12-06) show both: bf16 TP 1 at 4 streams mostly in phase
  1 (the three waited 73-120 ms, one prompt step), fp32 mostly in phase 2 (32-45 ms, one
  decode step). The plan replays both and reports their mean.

A step is one flat forward (torch: prompt chunks and decode rows together) or, for runners
without flat batches (ONNX), a prefill forward whose first tokens go out at once, then a
decode forward (scheduler.step's flush). Phase 1 starts all streams together against an
idle leader, phase 2 starts stream 0 alone and the others when its first token comes (the
others then trail it by two steps); each stream runs `rounds` requests and the first
`skip_rounds` are not counted (the benchmark's warm-up and first 20%).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

StepCost = Callable[[int, int, float, int], float]
"""(tokens, rows, mean context per token, sampled rows) -> seconds of one forward."""


@dataclass(frozen=True)
class LoopResult:
    ttft_p50_s: float
    """Median time from a request's send to its first token."""
    itl_p50_s: float
    """Median gap between a request's consecutive tokens."""
    tok_s: float
    """Tokens per second over all streams in the counted window."""


@dataclass
class _Req:
    stream: int
    sent: float
    arrives: float
    prompt: int
    new: int
    prefilled: int = 0
    tokens: list[float] = field(default_factory=list)


def simulate(cost: StepCost, *, streams: int, prompt: int, new: int, max_prefill_tokens: int,
             front_s: float, flat: bool = True, rounds: int = 6,
             skip_rounds: int = 2) -> LoopResult:
    """The mean of both phases (module docstring) of `streams` closed-loop streams of
    prompt + new tokens on one replica, measured as the benchmark measures them."""
    runs = [run(cost, streams=streams, prompt=prompt, new=new, budget=max_prefill_tokens,
                front_s=front_s, flat=flat, rounds=rounds, skip_rounds=skip_rounds, phase=ph)
            for ph in ((1, 2) if streams > 1 else (1,))]
    return LoopResult(*(statistics.fmean(getattr(r, f) for r in runs)
                        for f in ("ttft_p50_s", "itl_p50_s", "tok_s")))


def run(cost: StepCost, *, streams: int, prompt: int, new: int, budget: int, front_s: float,
        flat: bool, rounds: int, skip_rounds: int, phase: int = 1) -> LoopResult:
    """One phase: all streams start together against an idle leader (phase 1), or stream 0
    starts alone and the others when its first token comes (phase 2)."""
    if streams < 1 or new < 1 or prompt < 1:
        raise ValueError("streams, prompt and new tokens must be >= 1")
    sent = [0] * streams
    pending: list[_Req] = []  # sent, not yet admitted
    running: list[_Req] = []  # admitted, in arrival order
    done: list[_Req] = []

    def send(stream: int, t: float) -> None:
        if sent[stream] < rounds:
            sent[stream] += 1
            # requests sent at one instant reach the leader one after another
            pending.append(_Req(stream, t, t + front_s * (1 + 1e-6 * len(pending)), prompt,
                                new))

    for s in range(streams if phase == 1 else 1):
        send(s, 0.0)
    now = 0.0
    while pending or running:
        if not running:  # idle: the first arrival starts a step, alone
            now = max(now, min(r.arrives for r in pending))
        for r in sorted((r for r in pending if r.arrives <= now), key=lambda r: r.arrives):
            pending.remove(r)
            running.append(r)
        now, finished = _step(running, now, cost, budget, flat)
        if phase == 2 and not sent[-1] and done + running and (done + running)[0].tokens:
            for s in range(1, streams):  # the others, once stream 0 has its first token
                send(s, now)
        for r in finished:
            running.remove(r)
            done.append(r)
            send(r.stream, r.tokens[-1])
    return _measure(done, skip_rounds)


def _step(running: list[_Req], now: float, cost: StepCost, budget: int, flat: bool
          ) -> tuple[float, list[_Req]]:
    """One step from `now` over the admitted requests: (its end, the requests it finished)."""
    decode = [r for r in running if r.prefilled == r.prompt]
    if flat:  # as the scheduler: a flat step's decode rows count against its tokens
        budget = max(budget - len(decode), (budget + 1) // 2)
    chunks = []  # (request, prompt tokens this step)
    for r in running:
        if budget <= 0:
            break
        if r.prefilled < r.prompt:
            take = min(budget, r.prompt - r.prefilled)
            chunks.append((r, take))
            budget -= take
    chunk = sum(n for _, n in chunks)
    firsts = [r for r, n in chunks if r.prefilled + n == r.prompt]
    # mean context per token: a chunk's tokens see their prompt so far, a decode row its all
    pre_ctx = sum(n * (r.prefilled + n / 2) for r, n in chunks)
    dec_ctx = sum(r.prompt + len(r.tokens) for r in decode)
    if flat or not chunks or not decode:
        tokens = chunk + len(decode)
        end = now + cost(tokens, len(decode) + len(chunks), (pre_ctx + dec_ctx) / tokens,
                         len(decode) + len(firsts))
        first_at = end
    else:  # the prefill forward (its first tokens flushed), then the decode forward
        first_at = now + cost(chunk, len(chunks), pre_ctx / chunk, len(firsts))
        end = first_at + cost(len(decode), len(decode), dec_ctx / len(decode), len(decode))
    for r, n in chunks:
        r.prefilled += n
    for r in firsts:
        r.tokens.append(first_at)
    for r in decode:
        r.tokens.append(end)
    return end, [r for r in decode + firsts if len(r.tokens) >= r.new]


def _measure(done: list[_Req], skip_rounds: int) -> LoopResult:
    by_stream: dict[int, list[_Req]] = {}
    for r in sorted(done, key=lambda r: r.sent):
        by_stream.setdefault(r.stream, []).append(r)
    counted = [r for rs in by_stream.values() for r in rs[skip_rounds:]] or done
    t0 = max(rs[min(skip_rounds, len(rs) - 1)].sent for rs in by_stream.values())
    t1 = min(rs[-1].tokens[-1] for rs in by_stream.values())
    if t1 <= t0:  # too few rounds for a window: all of it
        t0, t1 = 0.0, max(r.tokens[-1] for r in done)
    n = sum(1 for r in done for t in r.tokens if t0 < t <= t1)
    gaps = [b - a for r in counted for a, b in zip(r.tokens, r.tokens[1:], strict=False)]
    return LoopResult(ttft_p50_s=statistics.median(r.tokens[0] - r.sent for r in counted),
                      itl_p50_s=statistics.median(gaps) if gaps else 0.0,
                      tok_s=n / (t1 - t0))
