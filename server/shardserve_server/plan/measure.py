"""`shardserve plan --measure`: time this machine's costs and store them (costs.py schema).

Five measurements, each short (the whole run aims at about 90 s on 2 cores):
1. GEMMs at the model's layer shapes (fused QKV, output, gate/up, down of one layer, TP 1)
   through the model's own Linear (cpu_gemm's path: packed bf16 or the bf16 GEMV, as the
   server runs them), in each dtype, at 1..host threads and several row counts, cycling
   through as many weight bytes as one real step reads (the whole model in that dtype,
   cold_copies), so the caches keep what they keep in a real step: no more, no less.
2. Weight-streaming read bandwidth: sums over a buffer of twice the last-level cache (at
   least 512 MiB), per thread count.
3. All-reduce between 2 ranks of a real gloo group (the TP transport of our workers): the
   median time of a 4-byte all-reduce (latency) and of a 4 MiB one (bandwidth).
4. Our engine's per-step overhead: a real `shardserve serve` of a tiny random Llama (its
   forward is negligible) per backend and dtype, driven over gRPC with 1 and 8 streams; the
   inter-token time at 1 stream is the fixed overhead, its growth to 8 streams the per-row
   one, the time to first token less a step the front end's share. And the model's own
   eager forward with its GEMMs emptied, at 1 and 128 tokens per dtype: the norms, rotary,
   attention and activations outside the GEMMs (measure_nongemm).
5. The TP layer loop: for each rank count (past the cores too) worker-like processes (their
   threads, niceness and gloo group) run the model's per-rank GEMMs with and without the
   collectives a TP step meets; the difference per collective is what a collective costs when
   ranks share the cores (measure_tp_collectives).
6. ONNX decode attention: the exported step graph's cost per decode row, cached token and
   layer (measure_onnx_attention), which the bytes of the keys and values over the bandwidth
   undercount (the graph gathers them out of the pool first).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .costs import MachineCosts, StepOverhead

ROWS = (1, 2, 4, 8, 32, 128, 512)
"""GEMM row counts timed: decode batches up to prefill chunks (serve's --max-prefill-tokens
defaults to 512; in-phase streams prefill several prompts in one step). 2 and 4: small decode
batches, where the rate is not log-linear between 1 and 8 rows (fp32 at 2 rows: 14.9 GFLOP/s
measured, 11.4 interpolated; results/plan_misses.md, 11:00 section)."""
OVERHEAD_DTYPES = {"torch": ("fp32", "bf16"), "onnx": ("fp32",)}
"""The dtypes whose engine overhead is measured per backend (the first is the default)."""
WEIGHT_BYTES_COLD = 96 * 2**20
"""Cycle over at least this many bytes of weights per GEMM pass (small models: past L2)."""
BANDWIDTH_MIN_BYTES = 512 * 2**20
"""The smallest buffer measure_bandwidth sums (and at least twice the last-level cache)."""


def llc_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache's size in bytes (sysfs `root`/index*/size; 0 where not
    readable). The 2-core machines of this project report a 300 MiB L3."""
    best = 0
    for f in root.glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


def model_weight_elems(config: Any) -> int:
    """Weight elements one decode step reads at TP 1: every layer's GEMMs plus the output
    projection (vocab x dim; tied or not, the step reads it)."""
    per_layer = sum(o * i for o, i in _layer_shapes(config))
    return int(config.n_layers) * per_layer + int(config.vocab_size) * int(config.dim)


def cold_copies(config: Any, elem_bytes: int) -> int:
    """Copies of one layer's GEMMs a timing pass cycles through: as many weight bytes as a
    real step reads (model_weight_elems; at least WEIGHT_BYTES_COLD, at most twice the
    last-level cache or BANDWIDTH_MIN_BYTES, whichever is larger). Fewer, and on a host
    whose last-level cache holds them the rates are cache rates: the 96 MiB set used before
    (2026-12-06) stayed in this machine's 300 MiB L3, and at 2 threads one pass of 30 SmolLM2
    layers at 1 row took 14 ms (fp32) / 8 ms (bf16) against 27 / 16 ms over the model's own
    425 / 212 MB (results/plan_misses.md, 11:00 section): the fp32 decode steps that stream
    540 MB from memory were predicted at ~0.7 of their time."""
    layer_bytes = sum(o * i for o, i in _layer_shapes(config)) * elem_bytes
    # past twice the last-level cache nothing stays between passes: more bytes time the same
    # (and a large model's whole weights need not fit this machine's memory)
    cap = max(2 * llc_bytes(), BANDWIDTH_MIN_BYTES)
    want = max(WEIGHT_BYTES_COLD, min(model_weight_elems(config) * elem_bytes, cap))
    return max(2, -(-want // layer_bytes))


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def _layer_shapes(config: Any) -> list[tuple[int, int]]:
    """(out, in) of the GEMMs of one layer at TP 1, from the model's own tensors."""
    from shardserve_sharding.models import expected_tensors

    shapes = [tuple(s) for n, s in expected_tensors("llama", config)
              if n.startswith("layers.0.") and len(s) == 2]
    return shapes  # type: ignore[return-value]


GEMM_ROUNDS = 4
"""Timed rounds of every GEMM point (the median is kept). With 2, single points moved by a
quarter or more between two quiet runs an hour apart (2026-12-06: bf16 1 thread 1 row 20.4 ->
15.9 GFLOP/s; ONNX 2 threads 4 rows 31 -> 48), and the predictions built on them by as much
(bf16 x2 at 1 stream: ITL predicted at 20.7 ms against 13.2 served)."""


def measure_gemm(config: Any, dtypes: tuple[str, ...], thread_counts: tuple[int, ...],
                 rounds: int = GEMM_ROUNDS, steady_state: bool = True
                 ) -> dict[str, dict[int, dict[int, float]]]:
    """dtype -> threads -> rows -> FLOP/s of one layer's GEMMs over a real step's weight
    bytes (cold_copies), timed in the steady state of consecutive passes of one shape
    (_steady_pass), as a server runs decode step after decode step: the caches then hold what
    they hold in such a run. A model that fits the last-level cache (SmolLM2 bf16: 269 MB in
    a 300 MiB L3) keeps more of it there pass after pass: 1-thread 1-row passes went 20 ->
    13 ms over 8 passes here, while fp32 (538 MB) stayed at ~36; a single pass after another
    row count's (whose bf16 path may read a packed copy of the weights) timed the first.

    Every (dtype, threads, rows) point is timed once per round and the rounds interleave, so
    a burst of load from other processes on a shared machine lands on one sample of many
    points rather than on every sample of one; the median of the rounds is kept."""
    from shardserve_sharding.models.llama import Linear

    shapes = _layer_shapes(config)
    stacks, xs = {}, {}
    with torch.no_grad():
        for dname in dtypes:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            copies = cold_copies(config, 4 if dt == torch.float32 else 2)
            stack = []
            for _ in range(copies):
                for o, i in shapes:
                    lin = Linear(i, o, bias=False, dtype=dt)
                    lin.requires_grad_(False)
                    stack.append(lin)
            stacks[dname] = stack
            for rows in ROWS:
                xs[dname, rows] = {i: torch.randn(rows, i, dtype=dt) for _, i in shapes}
    samples: dict[tuple[str, int, int], list[float]] = {}
    steady_passes = STEADY_PASSES if steady_state else 1
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms every path (packing, thread pools)
            for dname in dtypes:
                for th in thread_counts:
                    torch.set_num_threads(th)
                    for rows in ROWS:
                        x = xs[dname, rows]
                        took = _steady_pass(stacks[dname], x, steady_passes if r else 1)
                        if r:
                            samples.setdefault((dname, th, rows), []).append(took)
    out: dict[str, dict[int, dict[int, float]]] = {}
    for (dname, th, rows), times in samples.items():
        flops = 2 * sum(lin.in_features * lin.out_features for lin in stacks[dname]) * rows
        out.setdefault(dname, {}).setdefault(th, {})[rows] = flops / statistics.median(times)
    return out


STEADY_PASSES = 8
STEADY_SECONDS = 0.25
"""measure_gemm's steady state: consecutive passes of one shape, at least 2, at most
STEADY_PASSES, and no new pass once STEADY_SECONDS have gone (large row counts are
compute-bound: their caches matter little)."""


def _steady_pass(stack: list[Any], x: dict[int, torch.Tensor], passes: int) -> float:
    """Seconds of the last of up to `passes` consecutive passes over `stack` (x: rows by
    in-features; at least 2 when passes > 1, none started after STEADY_SECONDS): the steady
    state of a run of steps of this shape. The cache fills over several passes, not one
    (bf16 SmolLM2, 1 thread, 1 row: 19.9 19.9 18.5 14.8 14.2 13.6 13.4 12.9 ms)."""
    begin = time.perf_counter()
    took = 0.0
    for n in range(passes):
        if n >= 2 and time.perf_counter() - begin >= STEADY_SECONDS:
            break
        t0 = time.perf_counter()
        for lin in stack:
            lin(x[lin.in_features])  # [rows, out]
        took = time.perf_counter() - t0
    return took


NONGEMM_TOKENS = (1, 128)
"""Tokens per forward at which the model's non-GEMM time is timed (linear in between)."""


def synthetic_llama(config: Any, init: Any) -> torch.nn.Module:
    """A Llama-family Transformer of `config` on the CPU in eval mode, built on the meta device
    (no default init) and each parameter set in place by `init(p)`: timing runs need the shapes,
    not trained values."""
    from shardserve_sharding.models.llama import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.reset_buffers()
    with torch.no_grad():
        for p in model.parameters():
            init(p)
    return model.eval()


def measure_nongemm(config: Any, dtypes: tuple[str, ...], thread_counts: tuple[int, ...],
                    rounds: int = 3) -> dict[str, dict[int, dict[int, float]]]:
    """dtype -> threads -> tokens -> seconds of the model's own eager forward (TP 1; one row
    of a flat step over a paged cache, as the runner steps it: 1 token, a decode row; 128, a
    prompt chunk from position 0; logits of the last token) less the time spent inside its
    Linear layers' GEMMs, timed in place: what the norms, rotary, attention, activations and
    kernel launches of all layers cost beside real GEMMs (which evict what those read), and
    no GEMM table holds (in bf16 several of them run slower than in fp32 on a CPU).
    Rounds interleave as in measure_gemm; the median is kept."""
    import copy

    from shardserve_sharding.models.llama import Linear

    base = synthetic_llama(config, lambda p: p.fill_(0.01))
    models = {d: copy.deepcopy(base).to({"fp32": torch.float32, "bf16": torch.bfloat16}[d])
              for d in dtypes}
    del base
    for m in models.values():  # fp32 rotary tables, as the loader leaves them (the fused
        m.reset_buffers()  # bf16 path needs them: with bf16 tables it fell back to torch ops)
    gemm = Linear.forward
    in_gemms = [0.0]

    def timed_gemm(self: Any, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = gemm(self, x)  # [..., out]
        in_gemms[0] += time.perf_counter() - t0
        return y

    # the 1-token point is a decode row of a flat step over the paged cache (its attention
    # kernel, K/V write and step set-up), as the server runs it; without a cache it timed
    # SDPA's set-up per layer instead (~3 ms of SmolLM2 at 1 row, 2026-12-06, bf16 1-stream
    # ITL predicted at 10.9 ms against 7.6 served). The keys a row reads are the predictor's.
    # the prompt point likewise: one chunk from position 0 in a flat step over the paged
    # cache (K/V writes, the chunk's gather and SDPA, the step's set-up). On a cacheless
    # forward the bf16 128-token point was 8.4 ms (2 threads), over the paged cache with
    # empty GEMMs 10.4-12.6, against ~11.4 outside the GEMMs of the server's 100-token
    # prompt step (2026-12-06 13:50: bf16 1-stream TTFT predicted at 22 ms against 36 served)
    caches = {(d, t): _step_cache(m, t) for d, m in models.items() for t in NONGEMM_TOKENS}
    samples: dict[tuple[str, int, int], list[float]] = {}
    Linear.forward = timed_gemm  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            for r in range(rounds + 1):  # round 0 warms
                for d, model in models.items():
                    for th in thread_counts:
                        torch.set_num_threads(th)
                        for t in NONGEMM_TOKENS:
                            tokens = torch.zeros(1, t, dtype=torch.long)  # [1, T]
                            pos = torch.arange(t).unsqueeze(0)  # [1, T]
                            cache = caches[d, t]
                            in_gemms[0] = 0.0
                            t0 = time.perf_counter()
                            # one row of t tokens from position 0, as the runner steps it
                            cache.set_flat_step(torch.arange(_blocks(t)).unsqueeze(0),
                                                torch.arange(t), torch.tensor([t]))
                            model(tokens, pos, cache, torch.tensor([t - 1]))  # [1, V]
                            if r:
                                samples.setdefault((d, th, t), []).append(
                                    time.perf_counter() - t0 - in_gemms[0])
    finally:
        Linear.forward = gemm  # type: ignore[method-assign]
    out: dict[str, dict[int, dict[int, float]]] = {}
    for (d, th, t), times in samples.items():
        out.setdefault(d, {}).setdefault(th, {})[t] = statistics.median(times)
    return out


_BLOCK = 16
"""Block size of measure_nongemm's paged caches (the server's default)."""


def _blocks(tokens: int) -> int:
    return (tokens + _BLOCK - 1) // _BLOCK


def _step_cache(model: torch.nn.Module, tokens: int) -> Any:
    """A paged KV cache of `model`'s geometry and dtype holding one row of `tokens` tokens
    (measure_nongemm's points)."""
    from ..engine.paged_cache import PagedKVCache

    attn = model.layers[0].attention
    return PagedKVCache(n_layers=len(model.layers), num_blocks=_blocks(tokens),
                        block_size=_BLOCK, n_kv_heads=attn.n_kv_heads,
                        head_dim=attn.head_dim, dtype=model.norm.weight.dtype)


def measure_gemm_onnx(config: Any, thread_counts: tuple[int, ...], work: Path,
                      rounds: int = GEMM_ROUNDS) -> dict[int, dict[int, float]]:
    """threads -> rows -> FLOP/s of one layer's fp32 GEMMs in ONNX Runtime (the ONNX
    backend's own MLAS kernels and thread pool, made by runtime.make_session as the backend
    makes its sessions): MatMuls over a real step's weight bytes (cold_copies)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from shardserve_sharding.onnx_export.runtime import make_session

    shapes = _layer_shapes(config)
    copies = cold_copies(config, 4)
    ins = sorted({i for _, i in shapes})
    rng = np.random.default_rng(0)
    inits, nodes, outputs = [], [], []
    for c in range(copies):
        for k, (o, i) in enumerate(shapes):
            w, y, r = f"w{c}_{k}", f"y{c}_{k}", f"r{c}_{k}"
            inits.append(numpy_helper.from_array(
                rng.standard_normal((i, o), dtype=np.float32) * 0.02, w))  # [in, out]
            nodes.append(helper.make_node("MatMul", [f"x{i}", w], [y]))  # [rows, out]
            nodes.append(helper.make_node("ReduceSum", [y], [r], keepdims=0))
            outputs.append(helper.make_tensor_value_info(r, TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes, "gemms", [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["rows", i])
                         for i in ins], outputs, inits)
    path = work / "gemms.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    str(path))
    flops_per_row = 2 * sum(o * i for o, i in shapes) * copies
    sessions = {th: make_session(path, threads=th, spin=False) for th in thread_counts}
    feeds = {rows: {f"x{i}": rng.standard_normal((rows, i), dtype=np.float32) for i in ins}
             for rows in ROWS}
    samples: dict[tuple[int, int], list[float]] = {}
    for r in range(rounds + 1):  # interleaved as in measure_gemm; round 0 warms
        for th, sess in sessions.items():
            for rows in ROWS:
                t0 = time.perf_counter()
                sess.run(None, feeds[rows])
                if r:
                    samples.setdefault((th, rows), []).append(time.perf_counter() - t0)
    out: dict[int, dict[int, float]] = {}
    for (th, rows), times in samples.items():
        out.setdefault(th, {})[rows] = flops_per_row * rows / statistics.median(times)
    return out


ONNX_ATTN_ROWS = 4
ONNX_ATTN_CTX = (16, 272)
"""Decode rows and the two cached contexts at which measure_onnx_attention times a step."""


def measure_onnx_attention(config: Any, thread_counts: tuple[int, ...], work: Path,
                           rounds: int = 3, n_layers: int = 2) -> dict[int, float]:
    """threads -> seconds a decode row's step costs per cached token and layer in the ONNX
    backend: the exported step graph (llama_graph.py: it gathers each row's keys and values
    out of the pool into [B, S] tensors, then attends) run by OnnxStepRuntime as the server
    runs it, on a random `n_layers`-layer model of `config`'s width and heads, with
    ONNX_ATTN_ROWS decode rows at the two ONNX_ATTN_CTX contexts: the time's growth over the
    added row-tokens and layers. The GEMMs do not change with the context, so they cancel.
    A bytes-over-bandwidth term undercounts this ~4x (results/plan_misses.md, 11:00 section:
    1 thread, ~12 us a row-token over 30 layers against 46 KB / 16 GB/s = 2.9 us)."""
    import numpy as np

    from shardserve_sharding.onnx_export.export import export_onnx
    from shardserve_sharding.onnx_export.runtime import OnnxStepRuntime

    model, onnx_dir = work / "attn-model", work / "attn-onnx"
    if not onnx_dir.exists():
        _write_tiny(model, n_layers, like=config)
        export_onnx(model, onnx_dir, dtype="fp32", verify_hashes=False)
    bs = 16
    lo, hi = ONNX_ATTN_CTX
    rows = ONNX_ATTN_ROWS
    nblocks = -(-(hi + 1) // bs)
    tables = np.arange(rows * nblocks, dtype=np.int32).reshape(rows, nblocks)  # [B, blocks]
    runtimes = {th: OnnxStepRuntime(onnx_dir, kv_cache_tokens=rows * nblocks * bs,
                                    block_size=bs, max_slots=rows, threads=th)
                for th in thread_counts}
    samples: dict[tuple[int, int], list[float]] = {}
    for r in range(rounds + 1):  # interleaved as in measure_gemm; round 0 warms
        for th, rt in runtimes.items():
            for ctx in (lo, hi):
                args = (np.full((rows, 1), 5, np.int64),  # tokens [B, 1]
                        np.full((rows, 1), ctx, np.int64),  # positions [B, 1]
                        np.ones(rows, np.int64), np.zeros(rows, np.int64), tables)
                t0 = time.perf_counter()
                rt.forward(*args)  # [B, V]
                if r:
                    samples.setdefault((th, ctx), []).append(time.perf_counter() - t0)
    # a positive floor: a costs table holds positive numbers (noise can make the growth 0)
    return {th: max(1e-12, (statistics.median(samples[th, hi]) - statistics.median(
        samples[th, lo])) / (rows * (hi - lo) * n_layers)) for th in thread_counts}


def bandwidth_bytes() -> int:
    """The buffer measure_bandwidth sums: twice the last-level cache, at least 512 MiB (the
    256 MiB used before fit this machine's 300 MiB L3: 60 GB/s at 2 threads, a cache rate)."""
    return max(BANDWIDTH_MIN_BYTES, 2 * llc_bytes())


def measure_bandwidth(thread_counts: tuple[int, ...], nbytes: int | None = None
                      ) -> dict[int, float]:
    """threads -> read bandwidth (bytes/s) of summing a buffer past the caches
    (bandwidth_bytes() unless given)."""
    nbytes = nbytes or bandwidth_bytes()
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    out = {}
    for th in thread_counts:
        torch.set_num_threads(th)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t0)
        out[th] = nbytes / statistics.median(times[1:])
    return out


def _allreduce_rank(rank: int, port: int, q: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    res = {}
    for name, numel, reps in (("small", 1, 60), ("large", 2**20, 12)):
        t = torch.ones(numel)
        dist.all_reduce(t)  # warm
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times)
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def measure_allreduce() -> tuple[float, float]:
    """(latency s, bus bandwidth bytes/s) of gloo all-reduce between 2 local processes."""
    import torch.multiprocessing as mp

    from ..workers.group import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    lat = res["small"]
    nbytes = 4 * 2**20
    # ring: 2 (n-1)/n of the bytes cross the bus; n = 2
    bw = nbytes / max(1e-9, res["large"] - lat)
    return lat, bw


# ---- 5. collectives as the TP workers meet them, ranks sharing the host's cores

LOOP_STEPS = 6


def _rank_shapes(config: Any, ranks: int) -> list[tuple[int, int, bool]]:
    """(out, in, ends in an all-reduce) of one TP rank's GEMMs in one layer: the split table's
    rowwise tensors are cut along `in` and summed over ranks, the others cut along `out`."""
    from shardserve_sharding.models import expected_tensors
    from shardserve_sharding.split_table import SplitKind, split_kind

    out = []
    for name, shape in expected_tensors("llama", config):
        if not name.startswith("layers.0.") or len(shape) != 2:
            continue
        o, i = shape
        if split_kind("llama", name) is SplitKind.ROWWISE:
            out.append((o, -(-i // ranks), True))
        else:
            out.append((-(-o // ranks), i, False))
    return out


def _layer_loop_rank(rank: int, ranks: int, port: int, threads: int, config: Any,
                     steps: int, q: Any) -> None:
    """One rank of the synthetic layer loop: the worker's threads, niceness and gloo group,
    the model's per-rank GEMMs at one row (decode) over every layer (weights cold), and per
    step the collectives a worker meets: the plan's 2 broadcasts, the embedding's all-reduce,
    2 all-reduces per layer, the logits' all-gather. Run once without and once with the
    collectives; rank 0 reports the step times, barrier to barrier."""
    import torch.distributed as dist

    from shardserve_sharding.models.llama import Linear

    from ..workers.worker import WorkerConfig

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    os.nice(WorkerConfig.__dataclass_fields__["nice"].default)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ranks)
    dim = int(config.dim)
    with torch.no_grad():
        layers = []
        for _ in range(int(config.n_layers)):
            layer = []
            for o, i, reduce in _rank_shapes(config, ranks):
                lin = Linear(i, o, bias=False)
                lin.requires_grad_(False)
                lin.weight.fill_(0.01)
                layer.append((lin, reduce))
            layers.append(layer)
        head = Linear(dim, -(-int(config.vocab_size) // ranks), bias=False)
        head.requires_grad_(False)
        head.weight.fill_(0.01)
        xs = {i: torch.full((1, i), 0.5) for layer in layers for lin, _ in layer
              for i in (lin.in_features,)}
        res = {}
        for variant in ("free", "sync"):
            sync = variant == "sync"
            times = []
            for s in range(steps + 1):  # step 0 warms
                dist.barrier()
                t0 = time.perf_counter()
                if sync:
                    for n in (1, 64):  # the plan: its size, then its data
                        dist.broadcast(torch.zeros(n, dtype=torch.long), src=0)
                    dist.all_reduce(torch.zeros(1, dim))  # [1, dim] embedding rows
                for layer in layers:
                    for lin, reduce in layer:
                        y = lin(xs[lin.in_features])  # [1, out]
                        if reduce and sync:
                            dist.all_reduce(y)
                logits = head(xs[dim])  # [1, vocab / ranks]
                if sync:
                    dist.all_gather([torch.empty_like(logits) for _ in range(ranks)], logits)
                dist.barrier()
                if s:
                    times.append(time.perf_counter() - t0)
            res[variant] = statistics.median(times)
    if rank == 0:
        n = 2 + 1 + 2 * int(config.n_layers) + 1
        q.put((res["free"], res["sync"], n))
    dist.destroy_process_group()


def measure_tp_collectives(config: Any, rank_counts: tuple[int, ...], cores: int,
                           steps: int = LOOP_STEPS) -> dict[int, float]:
    """ranks -> seconds each collective adds to a TP decode step when `ranks` worker-like
    processes (max(1, cores // ranks) threads each, as `shardserve serve` gives them) share
    this host: (step with collectives - step without) / collectives per step. With more ranks
    than cores every meeting waits for the OS to run the rank it descheduled, which no
    2-process latency test shows."""
    import torch.multiprocessing as mp

    from ..workers.group import free_port

    ctx = mp.get_context("spawn")
    out = {}
    for ranks in rank_counts:
        q = ctx.Queue()
        port = free_port()
        threads = max(1, cores // ranks)
        procs = [ctx.Process(target=_layer_loop_rank,
                             args=(r, ranks, port, threads, config, steps, q))
                 for r in range(ranks)]
        for p in procs:
            p.start()
        try:
            free, sync, n = q.get(timeout=300)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        out[ranks] = max(0.0, (sync - free) / n)
    return out


def measure_overhead(backend: str, work: Path, seconds: float = 3.0, dtype: str = "fp32",
                     n_layers: int = 2) -> StepOverhead:
    """Inter-token time of a real server (`dtype`) on a tiny random model (its forward is
    negligible: what remains is the engine's scheduling, sampling and streaming) at 1 and 8
    streams; and its time to first token at 1 stream less one step: the front end's share of
    a TTFT (tokenizing, gRPC, admission, the pipes)."""
    import asyncio
    import re
    import subprocess
    import sys

    model = work / f"tiny-{n_layers}"
    if not model.exists():
        _write_tiny(model, n_layers)
    if backend == "onnx":
        onnx_dir = work / f"tiny-{n_layers}-onnx"
        if not onnx_dir.exists():
            from shardserve_sharding.onnx_export.export import export_onnx

            export_onnx(model, onnx_dir, dtype="fp32", verify_hashes=False)
        model = onnx_dir
    log = work / f"serve-{backend}-{dtype}.log"
    cmd = [sys.executable, "-m", "shardserve_server.cli", "serve", "--model", str(model),
           "--backend", backend, "--dtype", dtype, "--port", "0", "--metrics-port", "-1",
           "--no-verify"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        target = None
        deadline = time.monotonic() + 120
        while target is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tiny {backend} server exited; see {log}")
            m = re.search(r"listening on (\S+)", log.read_text(errors="replace"))
            target = m.group(1) if m else None
            time.sleep(0.2)
        if target is None:
            raise RuntimeError(f"tiny {backend} server did not start; see {log}")
        itl1, itl8, ttft1 = asyncio.run(_itl(target, seconds))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return StepOverhead(fixed_s=itl1, per_row_s=max(0.0, (itl8 - itl1) / 7),
                        first_token_s=max(0.0, ttft1 - itl1))


async def _itl(target: str, seconds: float) -> tuple[float, float, float]:
    """(ITL p50 at 1 stream, at 8 streams, TTFT p50 at 1 stream)."""
    import asyncio

    from shardserve_client import READINESS, AsyncClient

    async with AsyncClient(target) as c:
        for _ in range(200):
            try:
                if await c.health(READINESS, timeout=2):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(0.2)
        out = []
        ttfts: list[float] = []
        for streams in (1, 8):
            gaps: list[float] = []
            stop = time.perf_counter() + seconds

            async def stream(gaps=gaps, stop=stop, streams=streams) -> None:
                while time.perf_counter() < stop:
                    first = last = None
                    n = 0
                    sent = time.perf_counter()
                    async for chunk in c.generate_stream("hello world", max_new_tokens=24,
                                                         temperature=0.0, ignore_eos=True):
                        if chunk.token_ids:
                            last = time.perf_counter()
                            first = first or last
                            n += len(chunk.token_ids)
                    if streams == 1 and first is not None:
                        ttfts.append(first - sent)
                    if n > 2 and first is not None and last is not None:
                        # the decode span over its tokens: chunks that arrive together
                        # (several tokens per message) neither shrink nor stretch it
                        gaps.append((last - first) / (n - 1))

            await asyncio.gather(*(stream() for _ in range(streams)))
            out.append(statistics.median(gaps))
        return out[0], out[1], statistics.median(ttfts)


def _write_tiny(dst: Path, n_layers: int = 2, like: Any = None) -> None:
    """A random Llama checkpoint of `n_layers` layers with a 300-token BPE tokenizer: tiny
    shapes, or `like`'s (a Llama config: its width, heads and MLP; the vocabulary stays the
    tokenizer's)."""
    from shardserve_sharding.checkpoint.io import write_checkpoint
    from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
    from shardserve_sharding.models import build_model, checkpoint_names
    from shardserve_sharding.models.llama import LlamaConfig
    from shardserve_sharding.tokenizer import train_bpe

    tok = train_bpe(["hello world, the quick brown fox jumps over the lazy dog. " * 4],
                    vocab_size=300)
    if like is None:
        cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=n_layers, n_heads=4,
                          n_kv_heads=2, intermediate_size=96, max_seq_len=512)
    else:
        cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=int(like.dim), n_layers=n_layers,
                          n_heads=int(like.n_heads), n_kv_heads=int(like.n_kv_heads),
                          intermediate_size=int(like.intermediate_size),
                          rope_theta=float(like.rope_theta), max_seq_len=1024)
    torch.manual_seed(0)
    model = build_model("llama", cfg)
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    write_checkpoint(dst, family="llama", config=cfg.to_dict(),
                     tensors=((n, params[n].detach()) for n in names),
                     specs=[TensorSpec(n, torch.float32, tuple(params[n].shape)) for n in names],
                     tokenizer=tok, source={"format": "plan-measure-random"})


def measure(config: Any, *, backends: tuple[str, ...] = ("torch", "onnx"),
            max_ranks: int = 1, log: Any = print) -> MachineCosts:
    """Every measurement of the module docstring at `config`'s shapes (a Llama config); the
    TP layer loop for 2 .. max(max_ranks, cores + 1) ranks (always one count past the cores,
    where ranks start to wait on the OS scheduler)."""
    t0 = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    counts = tuple(sorted({1, cores}))
    old = torch.get_num_threads()
    try:
        gemm = measure_gemm(config, ("fp32", "bf16"), counts)
        log(f"  GEMMs at the model's shapes: {time.perf_counter() - t0:.1f} s")
        bw = measure_bandwidth(counts)
        log(f"  bandwidth: {max(bw.values()) / 1e9:.1f} GB/s")
        t1 = time.perf_counter()
        nongemm = measure_nongemm(config, ("fp32", "bf16"), counts)
        log(f"  outside the GEMMs ({time.perf_counter() - t1:.0f} s): " + ", ".join(
            f"{d} {tab[max(tab)][1] * 1e3:.1f} ms at 1 token"
            for d, tab in nongemm.items()))
    finally:
        torch.set_num_threads(old)
    lat, arbw = measure_allreduce()
    log(f"  all-reduce: {lat * 1e3:.2f} ms latency, {arbw / 1e9:.2f} GB/s")
    t1 = time.perf_counter()
    tp_coll = measure_tp_collectives(config, tuple(range(2, max(max_ranks, cores + 1) + 1)),
                                     cores)
    log(f"  TP layer loop ({time.perf_counter() - t1:.0f} s): per collective " + ", ".join(
        f"{r} ranks {c * 1e3:.2f} ms" for r, c in tp_coll.items()))
    overhead = {}
    by_dtype: dict[str, dict[str, StepOverhead]] = {}
    backend_gemm = {}
    attn_token: dict[str, dict[str, dict[int, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="shardserve-plan-") as d:
        if "onnx" in backends:
            t1 = time.perf_counter()
            backend_gemm["onnx"] = {"fp32": measure_gemm_onnx(config, counts, Path(d))}
            log(f"  ONNX Runtime GEMMs: {time.perf_counter() - t1:.1f} s")
            t1 = time.perf_counter()
            attn_token["onnx"] = {"fp32": measure_onnx_attention(config, counts, Path(d))}
            log(f"  ONNX attention ({time.perf_counter() - t1:.0f} s): " + ", ".join(
                f"{th} threads {v * 1e9:.0f} ns" for th, v in attn_token["onnx"]["fp32"].items())
                + " a row, cached token and layer")
        for b in backends:
            for dt in OVERHEAD_DTYPES[b]:
                ov = measure_overhead(b, Path(d), dtype=dt)
                by_dtype.setdefault(b, {})[dt] = ov
                overhead.setdefault(b, ov)
                log(f"  {b} {dt} step overhead: {ov.fixed_s * 1e3:.2f} ms + "
                    f"{ov.per_row_s * 1e3:.3f} ms/row; first token {ov.first_token_s * 1e3:.1f}"
                    " ms")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return MachineCosts(
        device=cpu_description(), host_threads=cores,
        memory_per_device_gib=round(mem / cores, 2), gemm_flops=gemm, mem_bw=bw,
        allreduce_latency_s=lat, allreduce_bw=arbw, overhead=overhead,
        backend_gemm_flops=backend_gemm, dtype_overhead=by_dtype, tp_collective_s=tp_coll,
        nongemm_s=nongemm, attn_token_s=attn_token, gemm_includes_memory=True,
        source=f"shardserve plan --measure ({time.perf_counter() - t0:.0f} s)",
        measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
