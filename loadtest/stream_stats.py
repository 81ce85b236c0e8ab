"""The pure parts of the peer benchmark (bench_vs_vllm.py): SSE framing, token counting from
OpenAI-style completion chunks, and the statistics of one measurement window.

A request is recorded as its send time and the arrival of each message that carried tokens,
`(time, tokens)`. A window of `seconds` counts only what falls after its first `skip` fraction:
tokens arriving there (tok/s over that part of the window), first-token latencies of requests
sent there, and inter-token latencies between messages both arriving there (a gap over a
message of k tokens counts k times, gap / k each).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field


class SSEParser:
    """Incremental server-sent-events parser: feed() bytes as they come, get each event's data.

    Follows the WHATWG framing that matters here: lines end in \\n, \\r\\n or \\r; `data:`
    lines of one event are joined with \\n; an empty line ends the event; `:` lines are
    comments; other fields (event, id, retry) are ignored.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, chunk: bytes | str) -> list[str]:
        text = chunk.decode("utf-8") if isinstance(chunk, bytes) else chunk
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the \n of a \r\n split across two chunks
        self._pending_cr = text.endswith("\r")
        self._buf += text
        lines = self._buf.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buf = lines.pop()  # the unfinished last line
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        return events


class TokenCounter:
    """Tokens carried by each chunk of one streamed /v1/completions response.

    With usage in a chunk (vLLM's `continuous_usage_stats`, or the final `include_usage` chunk)
    the count is exact: the chunk carries `completion_tokens` minus what was counted so far.
    Without it, a chunk with text counts one token (a server that holds back a token with no
    whole character yet sends nothing for it; the final usage chunk makes the total exact).
    """

    def __init__(self) -> None:
        self.counted = 0
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None

    def tokens(self, obj: dict) -> int:
        if "error" in obj and "choices" not in obj:
            raise RuntimeError(f"server error in stream: {obj['error']}")
        choices = obj.get("choices") or []
        for c in choices:
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]
        usage = obj.get("usage") or {}
        if usage.get("prompt_tokens") is not None:
            self.prompt_tokens = int(usage["prompt_tokens"])
        if usage.get("completion_tokens") is not None:
            n = max(0, int(usage["completion_tokens"]) - self.counted)
        else:
            n = sum(1 for c in choices if c.get("text"))
        self.counted += n
        return n


def parse_event(data: str) -> dict | None:
    """The JSON object of one SSE data payload, or None for the closing `[DONE]`."""
    if data.strip() == "[DONE]":
        return None
    return json.loads(data)


@dataclass
class Request:
    """One request of a closed-loop stream."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens)
    done: bool = False
    prompt_tokens: int | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    @property
    def first(self) -> float | None:
        return next((t for t, n in self.arrivals if n > 0), None)


def percentile(xs: Iterable[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between closest ranks; nan if empty."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class WindowStats:
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    n_ttft: int
    """Requests sent in the counted part that got their first token before the window closed."""
    completed: int
    """Requests that finished inside the counted part."""
    wrong_length: int
    """Of those, how many did not generate exactly the tokens asked (EOS not ignored, a cut)."""
    counted_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def window_stats(requests: list[Request], t0: float, t1: float, skip: float,
                 new_tokens: int) -> WindowStats:
    """Statistics of the requests of one window [t0, t1], its first `skip` fraction dropped."""
    cut = t0 + skip * (t1 - t0)
    tokens = 0
    ttft, itl = [], []
    completed = wrong = 0
    for r in requests:
        prev = None
        for t, n in r.arrivals:
            if n <= 0:
                continue
            if cut <= t <= t1:
                tokens += n
                if prev is not None and prev >= cut:
                    itl.extend([(t - prev) / n] * n)
            prev = t
        first = r.first
        if cut <= r.sent <= t1 and first is not None and first <= t1:
            ttft.append(first - r.sent)
        if r.done and r.arrivals and cut <= r.arrivals[-1][0] <= t1:
            completed += 1
            wrong += r.tokens != new_tokens
    span = t1 - cut
    return WindowStats(
        tok_s=tokens / span if span > 0 else math.nan,
        ttft_p50=percentile(ttft, 0.5), ttft_p99=percentile(ttft, 0.99),
        itl_p50=percentile(itl, 0.5), n_ttft=len(ttft), completed=completed,
        wrong_length=wrong, counted_s=span)
