"""Benchmark: the serving paths at two commits side by side (a refactor must not slow them).

    .venv/bin/python loadtest/bench_ab.py --base REF [--head REF] [--repeats 2]
        [--seconds 20] [--configs torch,onnx,tp2] [--note TEXT] [--out ab]

Each side is a source tree: --base (and --head, if given) is checked out with `git worktree
add --detach` under $SHARDSERVE_BENCH_CACHE/ab/; without --head the head is this working
tree. A side runs with this venv's Python and PYTHONPATH set to its server/, sharding/ and
clients/ folders (they come before the editable install's finder), so the servers, their
workers and the CLI commands run that side's code, while the load generator (the client code
of loadtest/bench_vs_vllm.py, driving gRPC and /v1/completions SSE) is the same for both.

Per repeat, the sides alternate order; per side, in turn:
- the server configurations named by --configs, each started alone, warmed up, then closed-
  loop streaming windows at its stream counts (distinct ~100-token prompts, 64 new tokens,
  greedy, EOS ignored; the first 20% of a window not counted):
  torch: `serve --dtype bf16`, gRPC at 1/8/32 streams and HTTP at 32;
  onnx: `serve --backend onnx` of the side's own `export-onnx` (fp32) of the model, gRPC
  at 1/8;
  onnx-nice0: the same with `--worker-nice 0` on both sides;
  tp2: `serve --tp 2 --dtype bf16`, gRPC at 8;
- `shardserve reshard MODEL OUT --tp 3 --quiet` (wall seconds);
- `shardserve generate --dtype bf16|fp32 --max-new-tokens 64 --json` (its generate_s; and its
  token ids: in fp32 they must be equal on both sides, greedy output unchanged).
Medians over the repeats, head / base for every figure (tok/s: higher is better; TTFT, ITL and
seconds: lower), and a line per figure that moved the wrong way by more than --tolerance.
Writes loadtest/results/ab.md (or --out NAME) with every window listed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bench_vs_vllm as bv
from results_io import cpu_flags, header, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    # name: (extra `serve` arguments, gRPC stream counts, HTTP stream counts)
    "torch": ("--dtype bf16", (1, 8, 32), (32,)),
    "onnx": ("--backend onnx", (1, 8), ()),
    "onnx-nice0": ("--backend onnx --worker-nice 0", (1, 8), ()),  # head's default is nice 10
    "tp2": ("--tp 2 --dtype bf16", (8,), ()),
}
LOWER_IS_BETTER = ("ttft_p50", "itl_p50", "seconds")
EXPORTED: set[str] = set()
"""Sides whose ONNX export this run has made."""
RUNS = itertools.count()
"""Server runs, numbering their log files ($SHARDSERVE_BENCH_CACHE/logs/shardserve-N.log)."""


@dataclass(frozen=True)
class Side:
    """One source tree under test."""

    name: str
    root: Path
    rev: str

    def env(self) -> dict[str, str]:
        paths = [str(self.root / d) for d in ("server", "sharding", "clients")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@dataclass(frozen=True)
class Figure:
    """One measured figure of one side in one repeat."""

    repeat: int
    side: str
    item: str
    key: str
    value: float


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(ref: str, name: str) -> Side:
    """A detached worktree of `ref` (made once, reused while the commit is the same)."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = bv.CACHE / "ab" / sha[:12]
    if not (path / "server").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", "--force", str(path), sha)
    return Side(name, path, sha[:12])


def this_tree() -> Side:
    dirty = " (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") \
        else ""
    return Side("head", ROOT, git("rev-parse", "--short=12", "HEAD") + dirty)


def serve_config(side: Side, model: Path, name: str, args, repeat: int,
                 prompts: list[str]) -> list[Figure]:
    extra, grpc_streams, http_streams = CONFIGS[name]
    os.environ["PYTHONPATH"] = side.env()["PYTHONPATH"]  # bv starts servers with os.environ
    run_args = argparse.Namespace(**vars(args))
    run_args.shardserve_args = extra
    run_args.streams = sorted(set(grpc_streams) | set(http_streams))
    if CONFIGS[name][0].startswith("--backend onnx"):
        model = onnx_export(side, model)
    server = bv.shardserve_server(model, bool(http_streams), run_args)
    proc, targets = server.start(next(RUNS))
    out: list[Figure] = []
    try:
        for target in targets:
            wanted = http_streams if "HTTP" in target.name else grpc_streams
            run_args.streams = list(wanted)
            proto = "HTTP" if "HTTP" in target.name else "gRPC"
            for rec in asyncio.run(bv.measure_server([target], prompts, run_args, repeat)):
                item = f"{name} {proto} {rec.streams} streams"
                out += [Figure(repeat, side.name, item, k, getattr(rec.stats, k))
                        for k in ("tok_s", "ttft_p50", "itl_p50")]
    finally:
        proc.stop()
        os.environ.pop("PYTHONPATH", None)
    return out


def onnx_export(side: Side, model: Path) -> Path:
    """The side's own fp32 ONNX export of `model`, made afresh once per run."""
    out = bv.CACHE / "ab" / f"onnx-{side.name}"
    if side.name not in EXPORTED:
        shutil.rmtree(out, ignore_errors=True)
        cli(side, ["export-onnx", str(model), str(out)], 1800)
        EXPORTED.add(side.name)
    return out


def cli(side: Side, argv: list[str], timeout: float) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "shardserve_server.cli", *argv], env=side.env(),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{side.name}: shardserve {' '.join(argv)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout


def cli_figures(side: Side, model: Path, repeat: int, outputs: dict[str, list[int]]
                ) -> list[Figure]:
    out: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        s, _ = cli(side, ["reshard", str(model), str(Path(tmp) / "tp3"), "--tp", "3",
                          "--quiet"], 900)
        out.append(Figure(repeat, side.name, "reshard to TP=3", "seconds", s))
    for dtype in ("bf16", "fp32"):
        _, stdout = cli(side, ["generate", "--model", str(model), "--prompt",
                               "Explain tensor parallelism in two sentences.", "--chat",
                               "--dtype", dtype, "--max-new-tokens", "64", "--json"], 900)
        res = json.loads(stdout.strip().splitlines()[-1])
        out.append(Figure(repeat, side.name, f"generate 64 tokens, {dtype}", "seconds",
                          float(res["generate_s"])))
        key = f"{side.name} {dtype}"
        outputs.setdefault(key, res["token_ids"])
        if outputs[key] != res["token_ids"]:
            raise RuntimeError(f"{key}: generate's greedy output changed between repeats")
    return out


def median(figs: list[Figure], side: str, item: str, key: str) -> float:
    xs = [f.value for f in figs if f.side == side and f.item == item and f.key == key]
    return statistics.median(xs) if xs else float("nan")


def report(figs: list[Figure], sides: list[Side], args, command: str, wall: float,
           same_output: dict[str, bool]) -> list[str]:
    lines = header("The serving paths at two commits, side by side", command)
    if args.note:
        lines += [f"**{args.note}**", ""]
    lines += [f"CPU flags: {cpu_flags()}; base `{sides[0].rev}`, head `{sides[1].rev}`; "
              f"{args.repeats} repeat(s), sides alternating; windows {args.seconds:g} s (first "
              f"20% not counted) after {args.warmup_seconds:g} s of warm-up; whole run "
              f"{wall / 60:.1f} min.", "",
              "Medians over the repeats. head / base: for tok/s higher is better, for TTFT, "
              "ITL and seconds lower is better; **bold** where head is worse by more than "
              f"{args.tolerance:.0%}.", "",
              "| what | figure | base | head | head / base |", "|---|---|---|---|---|"]
    worse = []
    for item, key in dict.fromkeys((f.item, f.key) for f in figs):
        b, h = median(figs, "base", item, key), median(figs, "head", item, key)
        r = h / b if b else float("nan")
        bad = (r > 1 + args.tolerance) if key in LOWER_IS_BETTER else (r < 1 - args.tolerance)
        scale = 1e3 if key in ("ttft_p50", "itl_p50") else 1.0
        unit = {"tok_s": "tok/s", "ttft_p50": "TTFT p50 ms", "itl_p50": "ITL p50 ms",
                "seconds": "s"}[key]
        cell = f"**{r:.3f}**" if bad else f"{r:.3f}"
        lines.append(f"| {item} | {unit} | {b * scale:.1f} | {h * scale:.1f} | {cell} |")
        if bad:
            worse.append(f"{item} {unit}")
    lines += ["", "Greedy output of `generate` (64 tokens) equal on both sides: " + (
              "; ".join(f"{d} {'yes' if eq else '**no**'}" for d, eq in same_output.items())
              or "not run") + " (fp32 must be; bf16 rounds differently wherever a kernel "
              "or the batch layout changes, and the fidelity tests bound it).",
              f"Figures worse by more than {args.tolerance:.0%}: "
              f"{', '.join(worse) if worse else 'none'}.", "", "Every measurement:", "",
              "| repeat | side | what | figure | value |", "|---|---|---|---|---|"]
    lines += [f"| {f.repeat + 1} | {f.side} | {f.item} | {f.key} | {f.value:.4g} |"
              for f in figs]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the base side")
    ap.add_argument("--head", default="", help="git revision of the head side (default: this "
                    "working tree)")
    ap.add_argument("--model", help="shardserve checkpoint (default: the bundled SmolLM2)")
    ap.add_argument("--configs", default="torch,onnx,tp2",
                    help=f"server configurations, comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--no-cli", action="store_true", help="skip the reshard and generate timings")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    ap.add_argument("--seconds", type=float, default=20.0, help="window per stream count")
    ap.add_argument("--warmup-seconds", type=float, default=5.0,
                    help="unrecorded warm-up per target, at its largest stream count")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between windows")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="server start limit (s)")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="a head figure worse than base by more than this is flagged")
    ap.add_argument("--note", default="", help="a line put in bold at the top of the results")
    ap.add_argument("--out", default="ab", help="results file name (loadtest/results/)")
    args = ap.parse_args()
    names = [c for c in args.configs.split(",") if c]
    if not set(names) <= set(CONFIGS):
        ap.error(f"--configs takes {', '.join(CONFIGS)}")
    t0 = time.perf_counter()
    sides = [checkout(args.base, "base"),
             checkout(args.head, "head") if args.head else this_tree()]
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest

    model = Path(args.model) if args.model else bv.bundled_checkpoint()
    prompts = bv.make_prompts(load_tokenizer(model, read_manifest(model)), 4000)
    figs: list[Figure] = []
    outputs: dict[str, list[int]] = {}
    for rep in range(args.repeats):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            print(f"repeat {rep + 1}: {side.name} ({side.rev})", flush=True)
            for name in names:
                figs += serve_config(side, model, name, args, rep, prompts)
            if not args.no_cli:
                figs += cli_figures(side, model, rep, outputs)
                print(f"  reshard {figs[-2].value:.1f} s, generate {figs[-1].value:.2f} s",
                      flush=True)
    same = {dtype: len({tuple(v) for k, v in outputs.items() if k.endswith(dtype)}) <= 1
            for dtype in ("bf16", "fp32") if outputs}
    command = " ".join([".venv/bin/python loadtest/bench_ab.py",
                        *(shlex.quote(a) for a in sys.argv[1:])])
    print(write_results(args.out, report(figs, sides, args, command, time.perf_counter() - t0,
                                         same)))
    return 0 if same.get("fp32", True) else 1


if __name__ == "__main__":
    sys.exit(main())
