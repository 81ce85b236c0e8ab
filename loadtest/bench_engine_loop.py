"""A/B: `shardserve generate`'s engine before and after LocalEngine ran the workers' loop.

    .venv/bin/python loadtest/bench_engine_loop.py [--model models/smollm2-135m] [--dtype bf16]
        [--batches 1,8] [--new-tokens 64] [--repeats 3] [--threads 2] [--baseline d415b2d]

The baseline is LocalEngine as of git revision --baseline (its own prefill / decode / sampling
loop over the dense KV cache), read with `git show` and imported beside the current one (the
modules it imports, sampling and sequence, kept their API). Both engines share one loaded
model and the prompts of bench_decode.py (batch b takes the first b); greedy, EOS ignored,
exactly --new-tokens per row. Each timed call is a whole generate() (prefill + decode); the
engines alternate call by call, the order flipping every repeat, so background load hits
both alike. Prints every run, the medians, the new/old ratio, and whether the greedy token ids
of the two engines are identical; writes loadtest/results/engine_loop.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_decode import PROMPTS  # noqa: E402
from results_io import cpu_flags, header, write_results  # noqa: E402

from shardserve_server.engine.local import EngineConfig, LocalEngine  # noqa: E402
from shardserve_server.engine.sampling import SamplingParams  # noqa: E402
from shardserve_server.engine.sequence import GenerationRequest  # noqa: E402
from shardserve_server.engine.stopping import StoppingParams  # noqa: E402
from shardserve_sharding.checkpoint.io import DTYPES, load_model  # noqa: E402

LOCAL = "server/shardserve_server/engine/local.py"


def baseline_module(rev: str, tmp: Path):
    """LocalEngine's module at git revision `rev`, importable outside its package."""
    src = subprocess.run(["git", "show", f"{rev}:{LOCAL}"], cwd=HERE.parent, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .", "from shardserve_server.engine.")
    path = tmp / "baseline_local.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_local", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory")
    ap.add_argument("--dtype", default="bf16", help="fp32 or bf16")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--baseline", default="d415b2d", help="git revision of the old engine")
    ap.add_argument("--out", default="engine_loop", help="results file name (loadtest/results/)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = DTYPES[{"bf16": "bfloat16", "fp32": "float32"}.get(a.dtype, a.dtype)]
    batches = [int(b) for b in a.batches.split(",")]
    m = load_model(a.model, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        old_mod = baseline_module(a.baseline, Path(tmp))
        engines = {
            "old": old_mod.LocalEngine(m.model, m.tokenizer, old_mod.EngineConfig(dtype=dtype)),
            "new": LocalEngine(m.model, m.tokenizer, EngineConfig(dtype=dtype)),
        }
    ids = [m.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0)
    stop = StoppingParams(max_new_tokens=a.new_tokens, ignore_eos=True)

    def reqs(b: int) -> list[GenerationRequest]:
        return [GenerationRequest(tuple(ids[i]), greedy, stop) for i in range(b)]

    for e in engines.values():  # warm-up: first-call allocations, oneDNN primitives
        for b in batches:
            e.generate(reqs(b))
    runs: list[tuple[int, int, str, float]] = []  # repeat, batch, engine, tok/s
    identical = True
    diffs: set[str] = set()
    for rep in range(a.repeats):
        for b in batches:
            order = ["old", "new"] if rep % 2 == 0 else ["new", "old"]
            outs = {}
            for name in order:
                t0 = time.perf_counter()
                res = engines[name].generate(reqs(b))
                s = time.perf_counter() - t0
                outs[name] = [r.token_ids for r in res]
                runs.append((rep, b, name, b * a.new_tokens / s))
                print(f"repeat {rep} batch {b} {name}: {s:.3f} s, "
                      f"{runs[-1][3]:.1f} tok/s", flush=True)
            identical &= outs["old"] == outs["new"]
            for k, (o, n) in enumerate(zip(outs["old"], outs["new"], strict=True)):
                if o != n:
                    at = next(i for i, (x, y) in enumerate(zip(o, n, strict=True)) if x != y)
                    diffs.add(f"batch {b} row {k}: first differs at new token {at}")
    lines = header("LocalEngine: own loop (old) vs the workers' GroupScheduler + ModelRunner (new)",
                   "python " + shlex.join(["loadtest/bench_engine_loop.py", *sys.argv[1:]]))
    lines += [f"CPU flags: {cpu_flags()}; torch {torch.__version__}; {a.threads} threads; "
              f"{a.dtype}; {a.new_tokens} new tokens per row, greedy, EOS ignored; "
              f"baseline: git {a.baseline}. End-to-end tok/s (prefill included).", "",
              f"Greedy token ids identical (old vs new, every run): {identical}", "",
              *(f"- {d}" for d in sorted(diffs)), *([""] if diffs else []),
              "| batch | old tok/s (median) | new tok/s (median) | new/old |", "|---|---|---|---|"]
    for b in batches:
        med = {n: statistics.median(r[3] for r in runs if r[1] == b and r[2] == n)
               for n in ("old", "new")}
        lines.append(f"| {b} | {med['old']:.1f} | {med['new']:.1f} | "
                     f"{med['new'] / med['old']:.3f} |")
    lines += ["", "Every run (in the order run):", "", "| repeat | batch | engine | tok/s |",
              "|---|---|---|---|"]
    lines += [f"| {r} | {b} | {n} | {v:.1f} |" for r, b, n, v in runs]
    text = write_results(a.out, lines)
    print(text)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
