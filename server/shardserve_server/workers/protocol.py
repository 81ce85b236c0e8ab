"""The typed wire between the front end and a worker group's leader (rank 0).

Every message that crosses the pipe is one of these frozen dataclasses; nothing else does.

front end -> leader      AddRequest, CancelRequest, StopGroup
leader -> front end      Ready (once, after loading and warm-up), StepOutputs (after every step
                         that produced output, and about once a second as a heartbeat), Fatal
                         (before the process dies)
group monitor -> engine  GroupDead (front-end side only: a rank exited or the pipe closed)

`TokenOutput` is the one token-output type from the scheduler to the servicer: the scheduler
makes it, it crosses the pipe inside StepOutputs, and the front end hands the same object to
the request's stream. Modelled on vLLM v1's EngineCoreRequest / EngineCoreOutputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.sequence import GenerationRequest, GenerationResult

# ---- front end -> leader


@dataclass(frozen=True)
class AddRequest:
    """Run this request (validated and tokenized by the front end)."""

    request: GenerationRequest
    priority: int = 0
    """Higher runs first among waiting requests."""


@dataclass(frozen=True)
class CancelRequest:
    """Stop a request; its last output carries FinishReason.CANCELLED."""

    request_id: str


@dataclass(frozen=True)
class StopGroup:
    """Stop the leader (and, through it, the followers)."""


ToLeader = AddRequest | CancelRequest | StopGroup

# ---- leader -> front end


@dataclass(frozen=True)
class TokenOutput:
    """What one request got from one step: a token, its final result, or both; or an error.

    A request's last TokenOutput has `result` set (finished, cancelled, failed). `error` is
    set only when the leader refused the request at AddRequest (it never ran)."""

    request_id: str
    token_id: int | None = None
    """The sampled token (None on a final output without a new token, e.g. a cancellation)."""
    text: str = ""
    """The text this token completed (may be empty while a multi-byte character is open)."""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    result: GenerationResult | None = None
    """Set on the request's last output."""
    admitted_at: float | None = None
    """time.monotonic() in the leader when the request got its cache (last output only)."""
    error: str | None = None
    """The leader refused the request at AddRequest (e.g. it can never fit the KV budget)."""
    index: int = 0
    """The sample this output belongs to (n > 1; the front end sets it, the leader sees each
    sample as a request of its own)."""


@dataclass(frozen=True)
class StepTiming:
    """Where the last step's time went (seconds, rows and tokens per phase)."""

    step_s: float = 0.0
    comm_s: float = 0.0
    """All-reduce time inside the step (TP > 1)."""
    batch: int = 0
    """Rows in the step (prefill and decode together)."""
    prefill_s: float | None = None
    prefill_rows: int = 0
    prefill_tokens: int = 0
    decode_s: float | None = None
    decode_rows: int = 0
    decode_tokens: int = 0


@dataclass(frozen=True)
class GroupStats:
    """The group's state after its last completed step (sent with every StepOutputs)."""

    steps: int = 0
    pending: int = 0
    running: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    reserved_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    tokens_out: int = 0
    prefill_s_total: float = 0.0
    decode_s_total: float = 0.0
    comm_s_total: float = 0.0
    forward_s_total: float = 0.0
    last_step: StepTiming | None = None
    """None before the first step."""

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV blocks in use."""
        return self.kv_used_blocks / max(1, self.kv_total_blocks)


@dataclass(frozen=True)
class StepOutputs:
    """The outputs of one step (or part of one, or none: a heartbeat) and the group's stats."""

    outputs: list[TokenOutput] = field(default_factory=list)
    stats: GroupStats = field(default_factory=GroupStats)


@dataclass(frozen=True)
class Ready:
    """The leader loaded its shard and warmed up."""

    load_s: float
    warmup_s: float
    rss_mb: float
    family: str


@dataclass(frozen=True)
class Fatal:
    """A rank is about to exit because of this error."""

    message: str
    traceback: str = ""


FromLeader = Ready | StepOutputs | Fatal

# ---- front-end side


@dataclass(frozen=True)
class GroupDead:
    """The group lost a rank or its leader pipe (made by WorkerGroup's monitor, not sent)."""

    reason: str
