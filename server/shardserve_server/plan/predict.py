"""Enumerate layouts (TP x PP x replicas x backend/dtype), judge their validity and predict
weight memory, KV capacity, TTFT, ITL and aggregate tok/s from a costs file.

The step model follows our engine (engine/scheduler.py, runner.py): a step is one forward
over all running rows' tokens; prompts are prefilled in chunks of at most max_prefill_tokens
per step, in the same (flat) step as the other rows' decodes. For one rank of a stage and a
step of T tokens over B rows at context C:

    gemm   = max(2 * matmul_elems * T / rate(dtype, T, threads), matmul_bytes / bandwidth)
             (the output projection's elements over the R sampled rows instead of T; no
             bandwidth term where the rates were timed over a real step's weight bytes:
             costs.gemm_includes_memory)
    attn   = B * C * kv_bytes_per_token / bandwidth + 4 * heads * head_dim * T * C / rate
             (where the costs measured the backend's attention per row, cached token and
             layer (ONNX: attn_token_s), that * B * C * layers replaces the bytes term)
    comm   = allreduces * allreduce(T * dim * act_bytes) + gather(B * vocab * 4)
             + 2 plan broadcasts                                               (TP > 1)
    other  = the model's measured forward outside its GEMMs at T tokens x the stage's share
             of the layers (torch; ONNX Runtime fuses these into its graph)
    step   = sum over stages + (PP - 1) sends of T * dim + overhead(backend, dtype, B)

A collective's latency is the one measured in the TP layer loop at that rank count where the
costs have it (with more ranks than cores, each meeting waits for the OS scheduler).

With S streams over R replicas a replica runs s = ceil(S / R) rows; its decode step
(T = B = s, C = prompt + new / 2) is the ITL. By default a request arrives alone: TTFT =
first_token_s (the front end's share) + a flat step of prompt + s - 1 tokens + half the
decode step in flight, and tok/s per replica = s * new / (s * prefill + (new - s) * decode).
With Workload.in_phase (closed-loop streams of equal length, as in our benchmarks) one
replica's streams finish in one step and send their next requests together; how the leader
takes them (the first alone, the rest a step later; two stable phases) is replayed step by
step in closed_loop.py on this step cost. Over several replicas the front end's balancing
(fewest outstanding tokens) splits such groups, so requests arrive alone there too, but
each is sent at a step boundary (its predecessor's last token) and reaches the replica it
goes to (the one it left: one row fewer) first_token_s later, while that replica's next step
has just begun: it waits that whole step, less first_token_s, not half of one. The server
logs behind results/plan_quiet.md show it: at 4 streams on 2 replicas the requests waited
36-59 ms for admission, one decode step (ITL p50 44 and 55 ms), unless their replica was idle.
Ranks on one host share its cores (a rank with fewer than one core gets a time share).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardserve_sharding.models import NAMED_CONFIGS, CacheKind, config_from_dict

from . import closed_loop
from .costs import MachineCosts
from .footprint import ACT_BYTES, DTYPE_BYTES, Footprint, footprint

GIB = 1024**3
PLAN_BROADCASTS = 2
"""Collectives per step outside the model at TP > 1 (runner.broadcast_plan)."""


@dataclass(frozen=True)
class Workload:
    """What the layouts are judged on."""

    streams: int = 8
    """Concurrent streams (closed loop)."""
    prompt_tokens: int = 100
    new_tokens: int = 64
    target_ttft_ms: float | None = None
    target_itl_ms: float | None = None
    memory_per_device_gib: float | None = None
    """None: the costs file's default."""
    memory_utilization: float = 0.9
    """Fraction of a device's memory for weights + KV (the rest: activations, runtime)."""
    kv_tokens: int | None = None
    """A fixed KV budget per replica (shardserve serve --kv-cache-tokens); None: all that fits."""
    max_prefill_tokens: int = 512
    """Prompt tokens per step (shardserve serve's chunked-prefill budget)."""
    in_phase: bool = False
    """Streams of equal length (a benchmark with EOS ignored): on one replica they finish in
    the same step and send their next requests together (replayed by closed_loop.py); over
    several replicas the balancer spreads them, each waiting for the step its replica has
    just begun. False: requests arrive one at a time, half a step in flight on average."""


@dataclass(frozen=True)
class LayoutChoice:
    backend: str
    dtype: str
    tp: int
    pp: int
    replicas: int

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.replicas

    @property
    def name(self) -> str:
        return f"{self.backend} {self.dtype} tp{self.tp} pp{self.pp} x{self.replicas}"


@dataclass(frozen=True)
class Prediction:
    layout: LayoutChoice
    valid: bool
    why: str
    """Why invalid, or notes for a valid one."""
    weight_gib_per_rank: float = 0.0
    kv_capacity_tokens: int = 0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tok_s: float = 0.0
    comm_share: float = 0.0
    """Fraction of a decode step spent in collectives."""
    meets_targets: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("layout"))
        d["layout"] = self.layout.name
        return d


@dataclass(frozen=True)
class ModelRef:
    name: str
    family: str
    config: Any


def resolve_model(ref: str) -> ModelRef:
    """A checkpoint dir (manifest.json), a named config (`smollm2-135m`), or a JSON file
    {"family": ..., "config": {...}}; ValueError with one line otherwise."""
    p = Path(ref)
    if p.is_dir():
        from shardserve_sharding.checkpoint.manifest import read_manifest

        m = read_manifest(p)
        return ModelRef(p.name, m.family, config_from_dict(m.family, m.config))
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{ref}: not a readable JSON model config ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
            raise ValueError(f"{ref}: expected {{\"family\": ..., \"config\": {{...}}}}")
        family = str(d.get("family", "llama"))
        try:
            config = config_from_dict(family, d["config"])
        except TypeError as e:
            raise ValueError(f"{ref}: bad config: {e}") from None
        return ModelRef(str(d.get("name", p.stem)), family, config)
    if ref in NAMED_CONFIGS:
        family, config = NAMED_CONFIGS[ref]
        return ModelRef(ref, family, config)
    raise ValueError(f"{ref}: neither a checkpoint directory, a JSON config file nor a named "
                     f"config ({', '.join(sorted(NAMED_CONFIGS))})")


def candidates(costs: MachineCosts, devices: int) -> list[LayoutChoice]:
    """Every TP x PP x replicas within `devices`, for each backend and dtype the costs cover:
    torch at every measured dtype but int8; ONNX at fp32 and int8 (where measured)."""
    out = []
    for backend in sorted(costs.overhead):
        dtypes = [d for d in sorted(costs.gemm_flops)
                  if (d in ("fp32", "int8")) == (backend == "onnx") or d == "fp32"]
        for dtype in dtypes:
            for tp in range(1, devices + 1):
                for pp in range(1, devices // tp + 1):
                    for r in range(1, devices // (tp * pp) + 1):
                        out.append(LayoutChoice(backend, dtype, tp, pp, r))
    return out


def _step_s(fp: Footprint, costs: MachineCosts, lay: LayoutChoice, threads: float,
            tokens: int, rows: int, ctx: float, vocab_rows: int, sharing: int = 1
            ) -> tuple[float, float]:
    """(step seconds, of which collectives) for one replica; `sharing` replicas on this
    host step at once (module-level note at _replica)."""
    wbytes = DTYPE_BYTES[lay.dtype]
    act = ACT_BYTES[lay.dtype]
    rate = costs.gemm_rate(lay.dtype, tokens, threads, lay.backend)
    head_rate = costs.gemm_rate(lay.dtype, vocab_rows, threads, lay.backend)
    bw = costs.bandwidth(threads)
    total = comm = 0.0
    for st in fp.stages:
        body = st.matmul_elems - st.head_elems
        floor = 0.0 if costs.gemm_includes_memory else 1.0  # rates timed over a step's bytes
        gemm = max(2 * body * tokens / rate, floor * body * wbytes / bw)
        if st.head_elems:  # the output projection runs on the sampled rows only
            gemm += max(2 * st.head_elems * vocab_rows / head_rate,
                        floor * st.head_elems * wbytes / bw)
        if sharing * lay.tp > 1 and costs.host_threads:
            # replicas stepping at once on one host stream their own weights each (every
            # rank its shard), through one memory system: each step's weights take at least
            # all of them over the host's bandwidth (the GEMM tables were timed by one
            # process, whose weights the last-level cache could partly hold)
            host_bw = costs.bandwidth(costs.host_threads)
            gemm = max(gemm, sharing * lay.tp * st.matmul_elems * wbytes / host_bw)
        layers_share = st.n_layers / max(1, max(s.n_layers for s in fp.stages))
        attn = layers_share * 4 * fp.attn_heads * fp.head_dim * tokens * ctx * st.n_layers \
            / rate
        per_token = costs.attention_token_s(lay.backend, lay.dtype, threads)
        if per_token is None:  # reading the rows' keys and values
            attn += layers_share * rows * ctx * fp.kv_elems_per_token * act / bw
        else:  # measured as the backend runs it (ONNX: gather out of the pool, attend)
            attn += rows * ctx * st.n_layers * per_token
        if lay.backend == "torch":  # norms, rotary, attention, activations (per rank)
            attn += costs.nongemm(lay.dtype, tokens, threads) * st.n_layers / sum(
                x.n_layers for x in fp.stages)
        c = st.allreduces * costs.allreduce_s(tokens * fp.dim * act, lay.tp)
        if st.gathers_vocab:
            c += costs.allreduce_s(vocab_rows * st.gathers_vocab * 4 / 2, lay.tp)
        total += gemm + attn + c
        comm += c
    if lay.tp > 1:  # the leader broadcasts each step's plan: its size, then its data
        plan = PLAN_BROADCASTS * costs.collective_latency_s(lay.tp)
        total += plan
        comm += plan
    if lay.pp > 1:
        send = (lay.pp - 1) * (costs.allreduce_latency_s + tokens * fp.dim * act
                               / costs.allreduce_bw)
        total += send
        comm += send
    ov = costs.step_overhead(lay.backend, lay.dtype)
    total += ov.fixed_s + ov.per_row_s * rows
    return total, comm


def predict(model: ModelRef, costs: MachineCosts, devices: int, work: Workload,
            layouts: list[LayoutChoice] | None = None) -> list[Prediction]:
    """A prediction (or the reason it is invalid) for every candidate layout."""
    mem = (work.memory_per_device_gib or costs.memory_per_device_gib) * GIB
    out = []
    cache: dict[tuple[int, int], Footprint | str] = {}
    for lay in layouts if layouts is not None else candidates(costs, devices):
        key = (lay.tp, lay.pp)
        if key not in cache:
            try:
                cache[key] = footprint(model.family, model.config, lay.tp, lay.pp)
            except ValueError as e:
                cache[key] = str(e)
        fp = cache[key]
        if isinstance(fp, str):
            out.append(Prediction(lay, False, fp))
            continue
        out.append(_one(fp, model, costs, lay, work, mem, devices))
    return out


def _one(fp: Footprint, model: ModelRef, costs: MachineCosts, lay: LayoutChoice,
         work: Workload, mem: float, devices: int) -> Prediction:
    if lay.devices > devices:
        return Prediction(lay, False, f"needs {lay.devices} devices, have {devices}")
    if lay.backend == "onnx" and (lay.tp > 1 or lay.pp > 1):
        return Prediction(lay, False, "the ONNX backend runs whole-model replicas (tp=pp=1)")
    if lay.dtype not in DTYPE_BYTES:
        return Prediction(lay, False, f"unknown dtype {lay.dtype}")
    weights = max(st.weight_elems for st in fp.stages) * DTYPE_BYTES[lay.dtype]
    budget = mem * work.memory_utilization - weights
    if budget <= 0:
        return Prediction(lay, False, f"weights {weights / GIB:.1f} GiB per rank exceed "
                          f"{work.memory_utilization:.0%} of {mem / GIB:.0f} GiB",
                          weight_gib_per_rank=weights / GIB)
    s = -(-work.streams // lay.replicas)  # rows of the busiest replica
    need = s * (work.prompt_tokens + work.new_tokens)
    if fp.cache_kind is CacheKind.PAGED_KV:
        per_tok = fp.kv_elems_per_token * ACT_BYTES[lay.dtype]
        kv_tokens = int(budget // per_tok)
    else:  # a state slot per sequence: capacity in sequences, shown as tokens of full ones
        slots = int(budget // max(1.0, fp.state_elems_per_seq * ACT_BYTES[lay.dtype]))
        kv_tokens = slots * (work.prompt_tokens + work.new_tokens)
    if work.kv_tokens is not None:
        kv_tokens = min(kv_tokens, work.kv_tokens)
    if kv_tokens < need:
        return Prediction(lay, False, f"KV room for {kv_tokens} tokens per replica, "
                          f"{s} streams need {need}", weight_gib_per_rank=weights / GIB,
                          kv_capacity_tokens=kv_tokens)
    threads = (costs.host_threads / lay.devices) if costs.host_threads else \
        float(max(costs.gemm_flops[lay.dtype]))  # a device's own compute
    busy = min(lay.replicas, work.streams)  # replicas stepping at once
    dec, dec_comm, ttft, _ = _replica(fp, costs, lay, threads, s, work, busy)
    if work.in_phase and lay.replicas == 1:  # equal-length streams: replayed step by step
        loop = _closed_loop(fp, costs, lay, threads, work)
        ttft, tok_s = loop.ttft_p50_s, loop.tok_s  # the ITL stays the s-row decode step
    else:
        tok_s = 0.0
        left = work.streams
        for r in range(lay.replicas):  # streams spread as evenly as the balancer does
            n = -(-left // (lay.replicas - r))
            left -= n
            if n:
                tok_s += _replica(fp, costs, lay, threads, n, work, busy)[3]
    notes = []
    if lay.pp > 1:
        notes.append("shardserve serve runs pp=1: planned for reference")
    if costs.host_threads and lay.devices > costs.host_threads:
        notes.append(f"{lay.devices} ranks share {costs.host_threads} cores")
        if lay.tp > 1:
            measured = lay.tp in costs.tp_collective_s
            notes.append(f"oversubscribed TP: {costs.collective_latency_s(lay.tp) * 1e3:.1f} ms "
                         "per collective" + (" (measured)" if measured else
                                             " (not measured at this rank count)"))
    meets = (work.target_ttft_ms is None or ttft * 1e3 <= work.target_ttft_ms) and (
        work.target_itl_ms is None or dec * 1e3 <= work.target_itl_ms)
    return Prediction(lay, True, "; ".join(notes), weights / GIB, kv_tokens, ttft * 1e3,
                      dec * 1e3, tok_s, dec_comm / dec if dec else 0.0, meets)


def _replica(fp: Footprint, costs: MachineCosts, lay: LayoutChoice, threads: float, n: int,
             work: Workload, sharing: int = 1) -> tuple[float, float, float, float]:
    """(decode step s, of which collectives, TTFT p50 s, tok/s) of a replica serving `n`
    closed-loop streams whose requests arrive one at a time: a request arrives alone, waits
    for the step in flight (half of it on average; with Workload.in_phase, all of it less the
    front end's share: it was sent at a step boundary, see the module docstring), and is
    prefilled in one flat step with the other n - 1 rows' decodes; a stream's period holds n
    such steps and new_tokens - n decode steps. `sharing`: replicas busy at once on this host
    (_step_s)."""
    p, g = work.prompt_tokens, work.new_tokens
    dec, dec_comm = _step_s(fp, costs, lay, threads, n, n, p + g / 2, n, sharing)
    front = costs.step_overhead(lay.backend, lay.dtype).first_token_s
    tokens = p + n - 1
    ctx = (p * p / 2 + (n - 1) * (p + g / 2)) / tokens
    pre, _ = _step_s(fp, costs, lay, threads, tokens, n, ctx, n, sharing)
    wait = max(0.0, dec - front) if work.in_phase else dec / 2
    ttft = front + pre + (wait if n > 1 else 0.0)
    period = min(n, g) * pre + max(g - n, 0) * dec + (front if n == 1 else 0.0)
    return dec, dec_comm, ttft, n * g / period


def _closed_loop(fp: Footprint, costs: MachineCosts, lay: LayoutChoice, threads: float,
                 work: Workload) -> closed_loop.LoopResult:
    """Workload.in_phase on one replica: the streams replayed step by step (closed_loop.py),
    each step costed by _step_s."""
    memo: dict[tuple[int, int, int, int], float] = {}

    def cost(tokens: int, rows: int, ctx: float, sampled: int) -> float:
        key = (tokens, rows, round(ctx), sampled)
        if key not in memo:
            memo[key] = _step_s(fp, costs, lay, threads, tokens, rows, round(ctx), sampled)[0]
        return memo[key]

    return closed_loop.simulate(
        cost, streams=work.streams, prompt=work.prompt_tokens,
        new=work.new_tokens, max_prefill_tokens=work.max_prefill_tokens,
        front_s=costs.step_overhead(lay.backend, lay.dtype).first_token_s,
        flat=lay.backend == "torch")


def recommend(preds: list[Prediction], work: Workload) -> tuple[Prediction | None, str]:
    """The layout to use and why: the highest aggregate tok/s among the servable layouts
    that meet the targets (fewer devices on a tie within 2%); without one that meets them,
    the lowest ITL."""
    valid = [p for p in preds if p.valid]
    if not valid:
        return None, "no layout is valid (see the reasons)"
    servable = [p for p in valid if p.layout.pp == 1] or valid
    ok = [p for p in servable if p.meets_targets]
    targets = ", ".join(t for t in (
        f"TTFT <= {work.target_ttft_ms:g} ms" if work.target_ttft_ms is not None else "",
        f"ITL <= {work.target_itl_ms:g} ms" if work.target_itl_ms is not None else "") if t)
    if not ok:
        best = min(servable, key=lambda p: (p.itl_ms, p.ttft_ms))
        return best, (f"no layout meets {targets}; this one has the lowest ITL "
                      f"({best.itl_ms:.1f} ms)")
    top = max(p.tok_s for p in ok)
    near = [p for p in ok if p.tok_s >= 0.98 * top]
    best = min(near, key=lambda p: (p.layout.devices, p.itl_ms))
    others = len(ok) - 1
    why = (f"highest predicted aggregate tok/s ({best.tok_s:.0f}) at {work.streams} streams"
           + (f" among {others + 1} layouts meeting {targets}" if targets else
              f" of {len(servable)} valid layouts"))
    if best.comm_share > 0.3:
        why += f"; note {best.comm_share:.0%} of a decode step is communication"
    return best, why
