"""torch's CPU weight-only kernels (int8, int4) and ours against bf16 F.linear at SmolLM2's shapes.

    .venv/bin/python loadtest/bench_quant_kernels.py [--threads 2] [--rows 1,32] [--repeats 5]
        [--isas native,avx2,avx-vnni] [--torchao PATH]   # PATH: pip install --target PATH torchao

For each weight shape of SmolLM2-135M ((in, out): fused QKV, wo, fused gate/up, down, lm_head)
and of one TP=3 rank, `--layers` distinct copies of the weight are multiplied in turn (so the
weights stream from memory as in a real forward, not from cache), for bf16 F.linear,
`_weight_int8pack_mm` (per-row int8) and `_weight_int4pack_mm_for_cpu` (group 32 and 64;
128 does not divide SmolLM2's 576), called directly (not through quant/kernels.py's modules,
which switch to a dense bf16 copy at DENSE_MIN_ROWS rows); our kernel (quant/cpu_kernel.py)
in each build of --isas this CPU runs ("qk" the native one, "avx2" / "avx-vnni" the forced
256-bit ones): int8 per row, int8 g32 (the default scheme) and int4 g32; and, with --torchao,
torchao's Int8WeightOnlyConfig / Int4WeightOnlyConfig on the same
weights. Prints a markdown table of microseconds per matmul (best of --repeats) and the
ratio to bf16; the paths are timed interleaved, shape by shape; with --threads 1 the clock
is the thread's CPU time (robust to other load), else wall time. Writes
loadtest/results/quant_kernels.md (--out).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import cpu_flags, header, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sharding"))
from shardserve_sharding.quant import cpu_kernel  # noqa: E402
from shardserve_sharding.quant.kernels import torch_int4_args  # noqa: E402
from shardserve_sharding.quant.scheme import quantize_int4, quantize_int8  # noqa: E402

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152),
          (576, 320), (192, 576), (576, 1024), (512, 576))
"""(in, out): SmolLM2-135M's weights, then one TP=3 rank's slices of the four layer weights."""


I8MM = torch.ops.aten._weight_int8pack_mm
I4MM = torch.ops.aten._weight_int4pack_mm_for_cpu


def best_us(fns, repeats: int, clock=time.perf_counter) -> float:
    for f in fns[:2]:
        f()
    runs = []
    for _ in range(repeats):
        t0 = clock()
        for f in fns:
            f()
        runs.append((clock() - t0) / len(fns) * 1e6)
    return min(runs)


def torchao_modules(ws: list[torch.Tensor], scheme: str, group: int) -> list | None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    mods = []
    for w in ws:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        cfg = (Int8WeightOnlyConfig() if scheme == "int8" else
               Int4WeightOnlyConfig(group_size=group, int4_packing_format="opaque"))
        try:
            quantize_(lin, cfg)
        except (ValueError, NotImplementedError, RuntimeError) as e:  # no CPU path for it
            print(f"torchao {scheme}: {type(e).__name__}: {e}")
            return None
        mods.append(lin)
    return mods


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--rows", default="1,32", help="comma-separated row counts (M)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per case (best is kept)")
    ap.add_argument("--layers", type=int, default=8,
                    help="distinct copies of each weight cycled through (defeats the cache)")
    ap.add_argument("--torchao", default="", help="folder with torchao to compare (optional)")
    ap.add_argument("--isas", default="native,avx2,avx-vnni",
                    help="builds of our kernel to time (those this CPU runs; see cpu_kernel.ISAS)")
    ap.add_argument("--out", default="quant_kernels", help="results file name (results/)")
    a = ap.parse_args()
    lines = header("torch CPU weight-only kernels vs bf16 F.linear (SmolLM2 shapes)",
                   "python loadtest/bench_quant_kernels.py " + " ".join(sys.argv[1:]))

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    if a.torchao:
        sys.path.insert(0, a.torchao)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # one thread: its own CPU time, which other processes on the machine barely disturb
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    out(f"cpu: {cpu_flags()}  capability {torch.backends.cpu.get_cpu_capability()}  "
        f"torch {torch.__version__}  threads {a.threads}  layers {a.layers}  clock "
        f"{'thread CPU time' if a.threads == 1 else 'wall'}")
    builds = {("qk" if isa == "native" else isa): cpu_kernel.kernel(isa)
              for isa in a.isas.split(",")}
    builds = {k: v for k, v in builds.items() if v is not None}
    out("our kernel builds: " + ", ".join(f"{k} = {v.isa()}" for k, v in builds.items()))
    ours = [f"{b} {c}" for b in builds for c in ("int8", "int8 g32", "int4 g32")]
    cols = ["bf16", "int8", "int4 g32", "int4 g64", *ours] + (
        ["ao int8", "ao int4 g32"] if a.torchao else [])
    out("| M | in | out | " + " | ".join(f"{c} us" for c in cols) + " | int8/bf16 | "
        "int4 g32/bf16 |")
    out("|" + "---|" * (len(cols) + 5))
    totals: dict[tuple[int, str], float] = {}
    with torch.inference_mode():
        for k, n in SHAPES:
            ws = [torch.randn(n, k).mul_(0.02).bfloat16() for _ in range(a.layers)]  # [N, K]
            q8 = [quantize_int8(w) for w in ws]  # per row: ([N, K], [N])
            q8g = [quantize_int8(w, None, 32) for w in ws]  # ([N, K], [N, K/32])
            q4 = [quantize_int4(w, 32) for w in ws]
            a8 = [(q, s.bfloat16()) for q, s in q8]  # the aten op's arguments
            a4 = [torch_int4_args(p, qp, torch.bfloat16) for p, qp in q4]
            a4b = [torch_int4_args(*quantize_int4(w, 64), torch.bfloat16) for w in ws]
            k8 = [cpu_kernel.pack_int8(*t) for t in q8]  # our packings (the same for every ISA)
            k8g = [cpu_kernel.pack_int8(*t) for t in q8g]
            k4 = [cpu_kernel.pack_int4(*t) for t in q4]
            ao8 = torchao_modules(ws, "int8", 0) if a.torchao else None
            ao4 = torchao_modules(ws, "int4", 32) if a.torchao else None
            for m in (int(r) for r in a.rows.split(",")):
                x = torch.randn(m, k).bfloat16()  # [M, K]
                paths = {
                    "bf16": [lambda x=x, w=w: F.linear(x, w) for w in ws],
                    "int8": [lambda x=x, q=q: I8MM(x, *q) for q in a8],
                    "int4 g32": [lambda x=x, q=q: I4MM(x, q[0], 32, q[1]) for q in a4],
                    "int4 g64": [lambda x=x, q=q: I4MM(x, q[0], 64, q[1]) for q in a4b],
                    "ao int8": [lambda x=x, q=q: q(x) for q in ao8] if ao8 else None,
                    "ao int4 g32": [lambda x=x, q=q: q(x) for q in ao4] if ao4 else None,
                }
                for b, mod in builds.items():
                    paths[f"{b} int8"] = [partial(mod.int8_linear, x, *t, n, k) for t in k8]
                    paths[f"{b} int8 g32"] = [partial(mod.int8_linear, x, *t, n, 32)
                                              for t in k8g]
                    paths[f"{b} int4 g32"] = [partial(mod.int4_linear, x, *t, n, 32) for t in k4]
                us = {c: (best_us(paths[c], a.repeats, clock) if paths.get(c) else float("nan"))
                      for c in cols}
                times = 30 if (k, n) in SHAPES[:4] else 1 if (k, n) == SHAPES[4] else 0
                for c in cols:
                    totals[(m, c)] = totals.get((m, c), 0.0) + us[c] * times
                out(f"| {m} | {k} | {n} | " + " | ".join(f"{us[c]:.0f}" for c in cols)
                    + f" | {us['int8'] / us['bf16']:.2f} | {us['int4 g32'] / us['bf16']:.2f} |")
    out()
    out("Whole-model GEMM time per forward (30 layers + lm_head), ms:")
    for m in sorted({m for m, _ in totals}):
        out(f"- M={m}: " + ", ".join(f"{c} {totals[(m, c)] / 1e3:.1f}" for c in cols))
    out()
    out("The machine was shared with other work; the paths alternate shape by shape.")
    write_results(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
