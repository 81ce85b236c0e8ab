"""The measured costs of a machine, as `shardserve plan --measure` stores them (JSON).

A costs file is what the planner's arithmetic runs on: GEMM rates at the model's shapes per
dtype and row count, the weight-streaming memory bandwidth, the all-reduce latency and
bandwidth between ranks, and our engine's per-step overhead per backend. Files are written
whole (temp then rename); a damaged or incomplete file raises CostsError naming the field.
The same schema holds published per-device figures (loadtest/plan/h100.json) for machines we
cannot measure, with their source in `source`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "shardserve-plan-costs/1"


class CostsError(ValueError):
    """A costs file is missing, damaged or incomplete; the message names the file and field."""


@dataclass(frozen=True)
class StepOverhead:
    """Our engine's time per step outside the model's GEMMs: scheduling, sampling, transfers."""

    fixed_s: float
    """Per step."""
    per_row_s: float
    """Per sequence in the step (sampling, detokenizing, streaming its token)."""
    first_token_s: float = 0.0
    """Per request, outside its steps: tokenizing, gRPC, admission and the pipes to the
    worker and back (a measured time to first token less one step)."""


@dataclass(frozen=True)
class MachineCosts:
    """What a machine's steps cost; rates are per rank given `threads_per_rank` threads."""

    device: str
    """The device in words (CPU model and flags, or GPU name)."""
    host_threads: int
    """Cores shared by every rank on this host (0: every device has its own compute)."""
    memory_per_device_gib: float
    """Default --memory-per-device."""
    gemm_flops: dict[str, dict[int, dict[int, float]]]
    """dtype -> threads -> rows -> FLOP/s of the model's layer GEMMs with cold weights."""
    mem_bw: dict[int, float]
    """threads -> weight-streaming read bandwidth (bytes/s)."""
    allreduce_latency_s: float
    """Time of an all-reduce of a few bytes between ranks."""
    allreduce_bw: float
    """Bus bandwidth of a large all-reduce (bytes/s)."""
    overhead: dict[str, StepOverhead]
    """backend (torch, onnx) -> per-step overhead of our engine."""
    backend_gemm_flops: dict[str, dict[str, dict[int, dict[int, float]]]] = field(
        default_factory=dict)
    """backend -> dtype -> threads -> rows -> FLOP/s where a backend has its own kernels
    (ONNX Runtime's MLAS and thread pool); absent: gemm_flops (torch's)."""
    dtype_overhead: dict[str, dict[str, StepOverhead]] = field(default_factory=dict)
    """backend -> dtype -> overhead where measured per dtype (bf16 norms, rotary and attention
    cost more per layer than fp32 on a CPU); absent: `overhead`."""
    tp_collective_s: dict[int, float] = field(default_factory=dict)
    """ranks -> seconds a collective of a TP step costs when that many worker processes share
    the host's cores (the layer loop of measure.py: with more ranks than cores each meeting
    waits for the OS to run a descheduled rank); absent: the 2-process latency."""
    nongemm_s: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    """dtype -> threads -> tokens -> seconds of the whole model's eager torch forward outside
    its GEMMs (norms, rotary, attention, activations, launches; measure.measure_nongemm);
    absent: none counted. ONNX Runtime fuses these into its graph: torch layouts only."""
    gemm_includes_memory: bool = False
    """The GEMM rates were timed over as many weight bytes as a real step reads (measure.py's
    cold_copies), so they hold the weights' streaming: the planner puts no bandwidth floor
    under them (one thread's buffer sum streams slower than its GEMV: 15 GB/s against 18).
    False (older files, published per-device figures): max(FLOPs / rate, bytes / bandwidth)."""
    attn_token_s: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    """backend -> dtype -> threads -> seconds a decode row's step costs per cached token and
    layer as that backend runs its attention (measure.measure_onnx_attention: the ONNX graph
    gathers the keys and values out of the pool, then attends); absent: the keys' and
    values' bytes over the bandwidth."""
    source: str = ""
    """How the figures were obtained (the command, or the published sources)."""
    measured_at: str = ""

    # ---- lookups the planner uses

    def gemm_rate(self, dtype: str, rows: float, threads: float, backend: str = "torch"
                  ) -> float:
        """FLOP/s of one rank's GEMMs over `rows` rows with `threads` threads (log-linear in
        rows between measured points, linear in threads; below one thread: a time share),
        from the backend's own table where it has one."""
        table = self.backend_gemm_flops.get(backend, {})
        if dtype not in table:
            table = self.gemm_flops
        if dtype not in table:
            raise CostsError(f"no GEMM rate for dtype {dtype!r}; measured: "
                             f"{sorted(self.gemm_flops)}")
        by_threads = table[dtype]
        return _interp_threads({t: _interp_log(by_rows, rows) for t, by_rows in
                                by_threads.items()}, threads)

    def bandwidth(self, threads: float) -> float:
        return _interp_threads(self.mem_bw, threads)

    def allreduce_s(self, nbytes: float, ranks: int) -> float:
        """Ring all-reduce: latency plus 2 (n-1)/n of the bytes over the bus bandwidth; the
        latency is the TP layer loop's per-collective cost at `ranks` where measured (beyond
        the largest measured count: that count's, as ranks past the cores wait alike)."""
        if ranks <= 1:
            return 0.0
        return self.collective_latency_s(ranks) + 2 * (ranks - 1) / ranks * nbytes / \
            self.allreduce_bw

    def collective_latency_s(self, ranks: int) -> float:
        if ranks <= 1:
            return 0.0
        if not self.tp_collective_s:
            return self.allreduce_latency_s
        known = [r for r in self.tp_collective_s if r <= ranks]
        return self.tp_collective_s[max(known)] if known else self.allreduce_latency_s

    def nongemm(self, dtype: str, tokens: float, threads: float) -> float:
        """Seconds of the whole model's forward outside its GEMMs over `tokens` tokens with
        `threads` threads (linear in tokens through the measured points; the largest measured
        thread count not above `threads`, and below the smallest a time share); 0 where not
        measured."""
        by_threads = self.nongemm_s.get(dtype)
        if not by_threads:
            return 0.0
        below = [t for t in by_threads if t <= threads]
        th = max(below) if below else min(by_threads)
        share = th / threads if threads < th else 1.0
        pts = sorted(by_threads[th].items())
        if len(pts) == 1:
            return pts[0][1] * share
        i = next((i for i, (t, _) in enumerate(pts) if tokens <= t), len(pts) - 1)
        (a, ya), (b, yb) = pts[max(0, i - 1)], pts[max(1, i)]
        return max(0.0, ya + (yb - ya) * (tokens - a) / (b - a)) * share

    def attention_token_s(self, backend: str, dtype: str, threads: float) -> float | None:
        """Seconds per decode row, cached token and layer for `backend` at `dtype` with
        `threads` threads (the largest measured thread count not above, a time share below
        the smallest); None where not measured."""
        by_threads = self.attn_token_s.get(backend, {}).get(dtype)
        if not by_threads:
            return None
        below = [t for t in by_threads if t <= threads]
        if below:
            return by_threads[max(below)]
        th = min(by_threads)
        return by_threads[th] * th / threads

    def step_overhead(self, backend: str, dtype: str) -> StepOverhead:
        """The engine's overhead for `backend` at `dtype` (its default where not measured)."""
        return self.dtype_overhead.get(backend, {}).get(dtype) or self.overhead[backend]

    # ---- file

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = SCHEMA
        return d

    def save(self, path: str | Path) -> None:
        """Write whole: a temp file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _interp_log(points: dict[int, float], x: float) -> float:
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]] * x / xs[0] if x < xs[0] else points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    for a, b in zip(xs, xs[1:], strict=False):
        if a <= x <= b:
            w = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
            return math.exp((1 - w) * math.log(points[a]) + w * math.log(points[b]))
    raise AssertionError("unreachable")


def _interp_threads(points: dict[int, float], t: float) -> float:
    ts = sorted(points)
    if t <= ts[0]:
        return points[ts[0]] * t / ts[0]  # a fraction of a thread: a time share
    if t >= ts[-1]:
        return points[ts[-1]]
    for a, b in zip(ts, ts[1:], strict=False):
        if a <= t <= b:
            w = (t - a) / (b - a)
            return (1 - w) * points[a] + w * points[b]
    raise AssertionError("unreachable")


def _num(d: dict[str, Any], key: str, where: str, *, positive: bool = True) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
            positive and v <= 0) or v < 0:
        raise CostsError(f"{where}: {key} must be a {'positive' if positive else 'non-negative'}"
                         f" number, got {v!r}")
    return float(v)


def _table(d: Any, where: str, depth: int) -> dict:
    """Nested {int-like key: ... positive number} tables of `depth` levels."""
    if depth == 0:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or \
                d <= 0:
            raise CostsError(f"{where} must be a positive number, got {d!r}")
        return d
    if not isinstance(d, dict) or not d:
        raise CostsError(f"{where} must be a non-empty table")
    return {_int_key(k, f"{where}:", 1): _table(v, f"{where}[{k}]", depth - 1)
            for k, v in d.items()}


def _int_key(k: Any, where: str, minimum: int) -> int:
    """A table key as an integer >= minimum (JSON keys are strings)."""
    try:
        key = int(k)
    except (TypeError, ValueError):
        raise CostsError(f"{where} key {k!r} is not an integer") from None
    if key < minimum:
        raise CostsError(f"{where} key {k!r} must be >= {minimum}")
    return key


def from_dict(d: Any, where: str = "costs") -> MachineCosts:
    """Parse and validate a costs object (CostsError names the bad field)."""
    if not isinstance(d, dict):
        raise CostsError(f"{where}: not a JSON object")
    if d.get("schema") != SCHEMA:
        raise CostsError(f"{where}: schema is {d.get('schema')!r}, expected {SCHEMA!r}")
    gemm = d.get("gemm_flops")
    if not isinstance(gemm, dict) or not gemm:
        raise CostsError(f"{where}: gemm_flops must be a non-empty table")
    overhead = d.get("overhead")
    if not isinstance(overhead, dict) or not overhead:
        raise CostsError(f"{where}: overhead must be a non-empty table")
    per_backend = d.get("backend_gemm_flops", {})
    if not isinstance(per_backend, dict) or not all(
            isinstance(v, dict) for v in per_backend.values()):
        raise CostsError(f"{where}: backend_gemm_flops must be a table of tables")
    threads = d.get("host_threads")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise CostsError(f"{where}: host_threads must be a non-negative integer")
    return MachineCosts(
        device=str(d.get("device", "")),
        host_threads=threads,
        memory_per_device_gib=_num(d, "memory_per_device_gib", where),
        gemm_flops={str(k): _table(v, f"{where}: gemm_flops[{k}]", 2) for k, v in gemm.items()},
        mem_bw=_table(d.get("mem_bw"), f"{where}: mem_bw", 1),
        allreduce_latency_s=_num(d, "allreduce_latency_s", where, positive=False),
        allreduce_bw=_num(d, "allreduce_bw", where),
        overhead={str(k): _overhead(v, f"{where}: overhead[{k}]")
                  for k, v in overhead.items()},
        dtype_overhead={str(b): {str(k): _overhead(v, f"{where}: dtype_overhead[{b}][{k}]")
                                 for k, v in t.items()}
                        for b, t in _tables(d.get("dtype_overhead", {}),
                                            f"{where}: dtype_overhead").items()},
        tp_collective_s=_tp_collectives(d.get("tp_collective_s"), where),
        nongemm_s={str(k): _table(v, f"{where}: nongemm_s[{k}]", 2)
                   for k, v in _tables(d.get("nongemm_s", {}), f"{where}: nongemm_s").items()},
        attn_token_s={str(b): {str(k): _table(v, f"{where}: attn_token_s[{b}][{k}]", 1)
                               for k, v in _tables(t, f"{where}: attn_token_s[{b}]").items()}
                      for b, t in _tables(d.get("attn_token_s", {}),
                                          f"{where}: attn_token_s").items()},
        backend_gemm_flops={str(b): {str(k): _table(v, f"{where}: backend_gemm_flops[{b}][{k}]",
                                                    2) for k, v in t.items()}
                            for b, t in per_backend.items()},
        gemm_includes_memory=_flag(d, "gemm_includes_memory", where),
        source=str(d.get("source", "")),
        measured_at=str(d.get("measured_at", "")),
    )


def _flag(d: dict[str, Any], key: str, where: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise CostsError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _overhead(v: Any, where: str) -> StepOverhead:
    if not isinstance(v, dict):
        raise CostsError(f"{where} is not a table")
    return StepOverhead(_num(v, "fixed_s", where, positive=False),
                        _num(v, "per_row_s", where, positive=False),
                        _num({"first_token_s": 0.0, **v}, "first_token_s", where,
                             positive=False))


def _tp_collectives(d: Any, where: str) -> dict[int, float]:
    """{ranks >= 2: non-negative seconds}."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise CostsError(f"{where}: tp_collective_s must be a table")
    out = {}
    for k, v in d.items():
        ranks = _int_key(k, f"{where}: tp_collective_s", 2)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise CostsError(f"{where}: tp_collective_s[{k}] must be a non-negative number, "
                             f"got {v!r}")
        out[ranks] = float(v)
    return out


def _tables(d: Any, where: str) -> dict:
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise CostsError(f"{where} must be a table of tables")
    return d


def load(path: str | Path) -> MachineCosts:
    """Read a costs file; CostsError (one line) for a missing, unreadable or damaged one."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CostsError(f"{path}: cannot read costs file ({e.strerror or e}); run "
                         "`shardserve plan --measure` first") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise CostsError(f"{path}: not valid JSON (line {e.lineno}): damaged costs file") \
            from None
    return from_dict(d, str(path))
