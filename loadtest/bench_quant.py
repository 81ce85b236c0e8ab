"""Quantized SmolLM2-135M (weight-only int8, int4) against our bf16: decode speed, perplexity and
greedy agreement, in one run; llama.cpp on the Q4_1 GGUF as the batch-1 peer when its Python
package is there.

    .venv/bin/python loadtest/bench_quant.py [--batches 1,32] [--new-tokens 64] [--repeats 3]
        [--threads 2] [--llamacpp-python PY] [--wait-quiet S] [--out quant]
        [--quality-only | --no-quality]

Checkpoints: the bundled model imported once (bench_decode.py's cache), then
`reshard --quantize int8` (the default: groups of 32, embedding int8 g32 too), `--quantize
int8 --group-size 0 --quantize-embedding int8` (per row, "int8-row") and `--quantize int4
--group-size 32|64` beside it (once; again where a stored one's manifest differs).

Speed: bench_decode.py's harness. Each variant (bf16 = the float checkpoint served in bf16;
int8: g32, the default; int8-row: per row; int4 g32) runs LocalEngine in a subprocess of its
own at bf16 activations; greedy, EOS ignored, batches of the first B of bench_decode's 32
prompts; decode tok/s = B (N - 1) / (t_N - t_1) (prefill excluded); the variants alternate
run by run; medians of --repeats. With --llamacpp-python (a Python with llama-cpp-python, see
llamacpp_peer.py), llama.cpp's batch-1 decode of the same GGUF runs in the same rotation;
without it there is no llama.cpp figure.

Quality, in this process at bf16 (fp32 for the reference row): perplexity of
loadtest/data/heldout_en.txt (one forward over the whole text); greedy agreement with bf16 on
the batch-32 run's generations: rows identical, mean common prefix, and teacher-forced top-1
agreement (each variant's argmax on bf16's own continuation). Writes loadtest/results/OUT.md.
--quality-only: no timing; the weight-grid table (the float model at fp32 with only its linear
weights, or only its embedding, through an int8 round trip per row / per group), one batch-32
greedy generation per speed variant for the agreement columns, then the quality part
(default OUT: quant_quality).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
from results_io import cpu_flags, header, write_results  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "heldout_en.txt"
SPEED_VARIANTS = ("bf16", "int8", "int8-row", "int4-g32")

NOTES = [
    "- The float checkpoint is the bundled GGUF dequantized: its linear weights are Q4_1 values "
    "(groups of 32) and its embedding Q8_0 values. int4 g32 reproduces those linear weights "
    "exactly (requantizing them finds the same blocks; `reshard --quantize int4` from the GGUF "
    "itself copies them), and int8 g32 on the embedding reproduces its Q8_0 blocks exactly; "
    "int8 per row ('int8-row') must approximate 32-wide 4-bit blocks with one step per row, "
    "int8 g32 ('int8', the default) with one step per 32 columns, and int4 g64 merges two "
    "blocks' ranges (about 8-9% weight error here, hence its perplexity).",
    "- The embedding / lm_head (tied) is int8 in every quantized variant (one copy serves the "
    "lookup and the output GEMM): per 32 columns ('int8-g32', the default), except int8-row, "
    "which keeps the earlier per-row embedding.",
    "- Kernels: where AVX2 is there, our C++ kernel (quant/cpu_kernel.py; AVX512-VNNI, "
    "AVX-VNNI or AVX2 code by the CPU) for at most 8 rows, else torch's `_weight_int8pack_mm` "
    "(per-row int8) / `_weight_int4pack_mm_for_cpu` for fewer than 6 rows; a dequantized bf16 "
    "copy above that (quant/kernels.py), so batch 32 runs the same bf16 GEMMs as the float "
    "model; loadtest/results/quant_kernels.md has the per-shape timings. Perplexity and "
    "top-1 agreement run whole sequences (the dense copy); the rows 'every row in the decode "
    "kernel' run them through our kernel instead, as decode steps do (its activation is two "
    "int8 digits per 32 columns). The fp32 pairs isolate the kernel (same weights, dense "
    "product vs kernel: they agree to 0.01%, so the kernel's activation rounding does not "
    "move perplexity); at bf16 the rest of the model's rounding moves perplexity by up to a "
    "percent either way between the dense and the kernel rows of the same weights.",
    "- Which rates to compare: on a quiet machine, the wall rates; where other processes "
    "share the cores, the per-CPU-second rates of 1-thread engines (--threads 1).",
]


def checkpoints(model: Path) -> dict[str, Path]:
    """variant -> checkpoint directory; quantized ones made from `model` once."""
    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.quant.scheme import QuantConfig
    from shardserve_sharding.reshard import reshard

    out = {"bf16": model}
    for name, qcfg in (("int8", QuantConfig("int8", 32, "int8-g32")),
                       ("int8-row", QuantConfig("int8", 0, "int8")),
                       ("int4-g32", QuantConfig("int4", 32, "int8-g32")),
                       ("int4-g64", QuantConfig("int4", 64, "int8-g32"))):
        dst = model.parent / f"{model.name}-{name}"
        have = None
        if (dst / "manifest.json").is_file():
            try:
                have = read_manifest(dst).quantization
            except Exception:  # an older layout: made again
                have = None
        if have != qcfg.to_dict():
            print(f"reshard --quantize {qcfg.to_dict()} -> {dst}", file=sys.stderr)
            reshard(model, dst, tp=1, quantize=qcfg.scheme, group_size=qcfg.group_size,
                    quantize_embedding=qcfg.embedding, overwrite=True)
        out[name] = dst
    return out


def llamacpp_rate(py: str, gguf: Path, batch: int, new: int, threads: int) -> float:
    out = subprocess.run([py, str(Path(__file__).resolve().parent / "llamacpp_peer.py"),
                          str(gguf), str(batch), str(new), str(threads)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tok_s"])


def speed(args, dirs: dict[str, Path], gguf: Path) -> tuple[dict, dict, list[str]]:
    """{(variant, batch): [decode tok/s per repeat]}, {variant: batch-32 tokens}, log lines."""
    engines = {v: bd.Engine("shardserve", "bf16", args, dirs[v], gguf) for v in SPEED_VARIANTS}
    rates: dict[tuple[str, int], list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    log = []
    try:
        for e in engines.values():  # warm-up: first-call allocations, dense copies
            e.run(max(args.batch_list), 8)
        for rep in range(args.repeats):
            order = list(SPEED_VARIANTS) if rep % 2 == 0 else list(reversed(SPEED_VARIANTS))
            for b in args.batch_list:
                for v in order:
                    bd._wait_quiet(args.wait_quiet)
                    r1 = bd._timed(engines[v], b, 1)
                    rn = bd._timed(engines[v], b, args.new_tokens, tokens=b == 32)
                    rate = b * (args.new_tokens - 1) / (rn["seconds"] - r1["seconds"])
                    cpu_rate = b * (args.new_tokens - 1) / (rn["cpu_s"] - r1["cpu_s"])
                    rates.setdefault((v, b), []).append(rate)
                    rates.setdefault((v + " cpu", b), []).append(cpu_rate)
                    if rn.get("tokens") is not None:
                        tokens[v] = rn["tokens"]
                    log.append(f"repeat {rep} batch {b} {v}: {rate:.1f} tok/s wall, "
                               f"{cpu_rate:.1f} per CPU second (other load "
                               f"{rn['other']:.2f} cores)")
                    print(log[-1], file=sys.stderr, flush=True)
                if b == 1 and args.llamacpp_python:
                    rate = llamacpp_rate(args.llamacpp_python, gguf, 1, args.new_tokens,
                                         args.threads)
                    rates.setdefault(("llama.cpp Q4_1", 1), []).append(rate)
                    log.append(f"repeat {rep} batch 1 llama.cpp Q4_1: {rate:.1f} tok/s")
                    print(log[-1], file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.close()
    return rates, tokens, log


@torch.inference_mode()
def quality(dirs: dict[str, Path], tokens: dict[str, list[list[int]]], threads: int,
            greedy: str = "the batch-32 speed run's") -> list[str]:
    from shardserve_sharding.checkpoint.io import load_model, load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.quant import cpu_kernel
    from shardserve_sharding.quant import kernels as qk

    kernel_max_rows = qk.KERNEL_MAX_ROWS
    torch.set_num_threads(threads)
    tok = load_tokenizer(dirs["bf16"], read_manifest(dirs["bf16"]))
    ids = torch.tensor([tok.encode(TEXT.read_text())])  # [1, T]
    pos = torch.arange(ids.shape[1])[None]
    prompts = [tok.encode(p) for p in bd.PROMPTS]
    ref_tokens = tokens.get("bf16")
    rows = ["| weights | activations | perplexity | vs float (same activations) | greedy rows "
            "identical | mean common prefix | teacher-forced top-1 agreement |",
            "|---|---|---|---|---|---|---|"]
    ppl_ref: dict[torch.dtype, float] = {}
    runs = [("bf16", torch.float32, False), *((v, torch.bfloat16, False) for v in dirs)]
    if cpu_kernel.kernel() is not None:
        # every row through the decode kernel, as decode steps run: at bf16, and at fp32 next to
        # the same weights' dense fp32 product (bf16's own rounding noise moves perplexity ~1%)
        quantized = [v for v in dirs if v != "bf16"]
        runs += [(v, torch.bfloat16, True) for v in quantized]
        runs += [(v, torch.float32, f) for v in quantized[:2] for f in (False, True)]
    else:
        runs += [(v, torch.float32, False) for v in dirs if v.startswith("int8")]
    for variant, dtype, forced in runs:
        name = ("fp32 (the GGUF's Q4_1/Q8_0 values)" if (variant, dtype) == ("bf16", torch.float32)
                else variant)
        if forced:
            name += ", every row in the decode kernel"
        qk.KERNEL_MAX_ROWS = 1 << 30 if forced else kernel_max_rows
        model = load_model(dirs[variant], dtype=dtype).model
        logits = model(ids, pos)[0, :-1].float()  # [T - 1, V]
        ppl = math.exp(float(F.cross_entropy(logits, ids[0, 1:])))
        if variant == "bf16":
            ppl_ref[dtype] = ppl
        agree = same = prefix = "-"
        if ref_tokens is not None and dtype == torch.bfloat16:
            hits = total = 0
            for p, cont in zip(prompts, ref_tokens, strict=False):
                seq = torch.tensor([p + cont])  # [1, P + N]
                out = model(seq, torch.arange(seq.shape[1])[None])[0]  # [P + N, V]
                pred = out[len(p) - 1 : -1].argmax(-1)  # [N]
                hits += int((pred == torch.tensor(cont)).sum())
                total += len(cont)
            agree = f"{hits / total:.3f}"
            if variant in tokens and not forced:
                n_same, pre = bd._compare(tokens[variant], ref_tokens)
                same, prefix = f"{n_same}/{len(ref_tokens)}", f"{pre:.1f}"
        rel = "-" if variant == "bf16" else f"{ppl / ppl_ref[dtype] - 1:+.2%}"
        act = ("fp32" if dtype == torch.float32 else "bf16") + (
            ", two int8 digits per 32 columns in the kernel" if forced else "")
        rows.append(f"| {name} | {act} | {ppl:.3f} | {rel} | {same} | {prefix} | {agree} |")
        print(rows[-1], file=sys.stderr, flush=True)
        del model
    qk.KERNEL_MAX_ROWS = kernel_max_rows
    return rows + ["", f"Text: {TEXT.relative_to(TEXT.parents[2])}, {ids.shape[1]} tokens. "
                   f"Greedy: {greedy} 32 prompts x the run's new tokens."]


def _preamble(args: argparse.Namespace, title_tail: str, run: str) -> list[str]:
    """The results file's title, command, CPU line (with `run`: this run's settings) and
    --note."""
    lines = header("Weight-only int8 / int4 against bf16 (SmolLM2-135M)" + title_tail,
                   "python loadtest/bench_quant.py " + shlex.join(sys.argv[1:]))
    lines += [f"CPU flags: {cpu_flags()}; torch {torch.__version__}, capability "
              f"{torch.backends.cpu.get_cpu_capability()}; {run}", ""]
    return lines + ([f"**{args.note}**", ""] if args.note else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="float shardserve checkpoint (default: the bundled model)")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per engine")
    ap.add_argument("--llamacpp-python", default="",
                    help="a Python with llama-cpp-python: llama.cpp runs in the same rotation")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run, wait up to S seconds for idle CPUs")
    ap.add_argument("--note", default="", help="a line put in bold under the header (e.g. "
                    "whether the machine was shared)")
    ap.add_argument("--out", default=None, help="results file name (loadtest/results/; "
                    "default quant, with --quality-only quant_quality)")
    ap.add_argument("--no-quality", action="store_true",
                    help="only the speed part (the quality section says it was not run)")
    ap.add_argument("--quality-only", action="store_true",
                    help="skip the timing: one greedy batch-32 generation per variant (for the "
                    "agreement columns), then the quality part")
    args = ap.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",")]
    model, gguf = bd._ensure_model(args.model)
    dirs = checkpoints(model)
    t0 = time.time()
    if args.quality_only:
        return quality_only(args, dirs, gguf, t0)
    rates, tokens, log = speed(args, dirs, gguf)
    qrows = (["Not run (--no-quality)."] if args.no_quality
             else quality(dirs, tokens, args.threads))
    med = {k: bd._median(v) for k, v in rates.items()}
    lines = _preamble(args, "", f"{args.threads} thread(s) per engine; {args.new_tokens} new "
                      f"tokens; {args.repeats} repeats; {time.time() - t0:.0f} s.")
    lines += ["## Decode tok/s (median; prefill excluded)", "",
              "| batch | " + " | ".join(SPEED_VARIANTS) + " | "
              + " | ".join(f"{v}/bf16" for v in SPEED_VARIANTS[1:]) + " |",
              "|---|" + "---|" * (2 * len(SPEED_VARIANTS) - 1)]
    for b in args.batch_list:
        vals = [med.get((v, b), float("nan")) for v in SPEED_VARIANTS]
        lines.append(f"| {b} | " + " | ".join(f"{x:.1f}" for x in vals) + " | "
                     + " | ".join(f"{x / vals[0]:.2f}" for x in vals[1:]) + " |")
    lines += ["", "Decode tokens per CPU second of the engine process (with 1 thread: the rate of "
              "an otherwise idle core, robust to other load; with more, spin-waits count too):",
              "", lines[-len(args.batch_list) - 2], lines[-len(args.batch_list) - 1]]
    for b in args.batch_list:
        vals = [med.get((v + " cpu", b), float("nan")) for v in SPEED_VARIANTS]
        lines.append(f"| {b} | " + " | ".join(f"{x:.1f}" for x in vals) + " | "
                     + " | ".join(f"{x / vals[0]:.2f}" for x in vals[1:]) + " |")
    lines.append("")
    if ("llama.cpp Q4_1", 1) in med and 1 in args.batch_list:
        peer = med[("llama.cpp Q4_1", 1)]
        lines.append(f"Batch 1, int4 g32 / llama.cpp Q4_1 ({peer:.1f} tok/s, measured in this "
                     f"run): {med[('int4-g32', 1)] / peer:.2f}")
    else:  # a ratio is only against a peer measured in the same run
        lines.append("llama.cpp Q4_1: not run (--llamacpp-python not given): no ratio.")
    lines += ["", "## Quality", "", *qrows, "", "## How to read this", "", *NOTES, "",
              "## Every run", "", *[f"- {x}" for x in log]]
    print(write_results(args.out or "quant", lines))
    return 0


@torch.inference_mode()
def weight_grid(model_dir: Path, threads: int) -> list[str]:
    """Which weights' grid moves perplexity: the float model at fp32 with only the linear
    weights, or only the (tied) embedding, replaced by their int8 round trip (per row, per
    group), everything else float; dense fp32 products, so no kernel is involved."""
    from shardserve_sharding.checkpoint.io import load_model, load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.quant.scheme import dequantize_int8, quantize_int8

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir, read_manifest(model_dir))
    ids = torch.tensor([tok.encode(TEXT.read_text())])  # [1, T]
    pos = torch.arange(ids.shape[1])[None]
    model = load_model(model_dir, dtype=torch.float32).model

    def ppl() -> float:
        logits = model(ids, pos)[0, :-1].float()  # [T - 1, V]
        return math.exp(float(F.cross_entropy(logits, ids[0, 1:])))

    linear = [p for n, p in model.named_parameters()
              if n.endswith((".wqkv.weight", ".wo.weight", ".w13.weight", ".w2.weight"))]
    emb = [model.tok_embeddings.weight]  # tied: the lm_head too
    base = ppl()
    rows = ["| int8 round trip of | scales | weight error (rms, relative) | perplexity (fp32) "
            "| vs float |", "|---|---|---|---|---|", f"| nothing | - | 0 | {base:.3f} | - |"]
    for what, params in (("linear weights", linear), ("embedding / lm_head", emb)):
        for group in (0, 32, 64):
            saved = [p.detach().clone() for p in params]
            err = tot = 0.0
            for p in params:
                dq = dequantize_int8(*quantize_int8(p, None, group))  # [N, K]
                err += float((dq - p).double().pow(2).sum())
                tot += float(p.double().pow(2).sum())
                p.copy_(dq)
            v = ppl()
            rows.append(f"| {what} | {'per row' if not group else f'per {group} columns'} | "
                        f"{math.sqrt(err / tot):.4f} | {v:.3f} | {v / base - 1:+.2%} |")
            print(rows[-1], file=sys.stderr, flush=True)
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
    return rows


def greedy_tokens(args, dirs: dict[str, Path], gguf: Path) -> dict[str, list[list[int]]]:
    """{variant: tokens} of one batch-32 greedy run of each speed variant (no timing)."""
    tokens = {}
    for v in SPEED_VARIANTS:
        e = bd.Engine("shardserve", "bf16", args, dirs[v], gguf)
        try:
            tokens[v] = e.run(32, args.new_tokens, True)["tokens"]
        finally:
            e.close()
    return tokens


def quality_only(args, dirs: dict[str, Path], gguf: Path, t0: float) -> int:
    grid = weight_grid(dirs["bf16"], args.threads)
    qrows = quality(dirs, greedy_tokens(args, dirs, gguf), args.threads,
                    "one batch-32 greedy run of each variant (not timed):")
    from shardserve_sharding.quant import cpu_kernel

    mod = cpu_kernel.kernel()
    lines = _preamble(args, ": quality only", f"quantized kernel "
                      f"{mod.isa() if mod else 'not built'}; {args.threads} thread(s); "
                      f"{args.new_tokens} new tokens; {time.time() - t0:.0f} s.")
    lines += ["## Quality", "", *qrows, "", "## What moves int8's perplexity: the weight grid",
              "", *grid, "", "## How to read this", "", *NOTES]
    print(write_results(args.out or "quant_quality", lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
