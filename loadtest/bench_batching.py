"""Benchmark: continuous-batching decode throughput of shard workers against transformers.

    .venv/bin/shardserve import bundled /tmp/bb_smol --quiet        # once (fp32 checkpoint)
    .venv/bin/python loadtest/bench_batching.py --model-dir /tmp/bb_smol

SmolLM2-135M in bf16 (WorkerConfig(dtype="bfloat16"); the checkpoint is fp32 and the workers
cast it) behind `AsyncEngine` at TP=1 with 2 intra-op threads. For each concurrency (1, 8,
32, 64) that many requests are submitted at once, each a ~20-token prompt (18-22 tokens) with
128 new tokens, greedy, ignore_eos. Reported per concurrency:

- tok/s: generated tokens / wall time from submission to the last result (prefill included);
- decode tok/s: tokens generated after every sequence had its first token / the time from the
  last first token to the last result (the steady decode rate, "excluding the start").

In the same run, a separate subprocess runs transformers' static batched `generate` on the
same prompts (weights from the same GGUF, bf16, left padding, greedy, EOS off, 2 threads):
tok/s is N * 128 / the time of one `generate` call; decode tok/s subtracts the time of a
`generate` with max_new_tokens=1 (prefill and first token) and counts N * 127 tokens. The
ratios shardserve / transformers are printed and written.

Then TP=3 (three rank processes, 1 thread each, gloo, on the same 2 cores) against TP=1 at
32 concurrent sequences, with the share of the leader's forward time spent in all-reduce
(stats `comm_s` / `forward_s`, per-step `last_step`), and whether the greedy tokens agree.

Writes loadtest/results/batching.md (atomically: temp file, then rename).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import header, write_results

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python loadtest/bench_batching.py --model-dir /tmp/bb_smol"

SENTENCES = [
    "The history of the Roman Empire spans many centuries and includes",
    "In a small village at the edge of the forest there lived an old",
    "Write a Python function that returns the nth Fibonacci number using",
    "The main differences between classical and quantum computers are that",
    "Once upon a time, a curious young fox decided to explore the great",
    "Photosynthesis is the process by which green plants convert sunlight into",
    "Here is a recipe for a simple tomato soup that anyone can cook at",
    "The stock market fell sharply on Monday after reports suggested that the",
    "To install the package, open a terminal and run the following command",
    "My favourite season is autumn because the leaves turn red and golden and",
    "The theory of relativity, proposed by Albert Einstein, changed the way",
    "Dear team, I am writing to let you know that the quarterly report is",
]

HF_CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
from transformers import AutoModelForCausalLM
spec = json.load(open(sys.argv[1]))
gguf = spec["gguf"]
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf),
                                             gguf_file=os.path.basename(gguf),
                                             dtype=torch.float32).to(torch.bfloat16).eval()
model.generation_config.eos_token_id = None  # ignore_eos: always max_new_tokens
pad = 0

def batch(prompts):
    t = max(map(len, prompts))
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return ids, mask

def gen(prompts, n):
    ids, mask = batch(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad)
    dt = time.perf_counter() - t0
    return dt, out[:, ids.shape[1]:].tolist()

gen(spec["prompts"][:8], 8)  # warm-up
res = {}
for n in spec["concurrency"]:
    prompts = spec["prompts"][:n]
    t1, _ = gen(prompts, 1)
    tn, toks = gen(prompts, spec["new_tokens"])
    res[str(n)] = {"total_s": tn, "first_s": t1, "tokens": toks}
print("RESULT " + json.dumps(res))
"""


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n distinct prompts of 18-22 tokens: sentence i mod 12, cut or extended by the next."""
    out = []
    for i in range(n):
        text = f"{SENTENCES[i % len(SENTENCES)]} {SENTENCES[(i * 5 + 1) % len(SENTENCES)]}"
        ids = list(tokenizer.encode(text))
        length = 18 + (i * 7 + seed) % 5
        out.append(ids[:length])
    return out


class StepStats:
    """Leader stats messages (one per step that produced tokens), collected by on_stats."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.last: dict = {}

    def __call__(self, stats, replica: int) -> None:
        """stats: the group's GroupStats (workers/protocol.py), kept as plain dicts here."""
        self.last = {"forward_s": stats.forward_s_total, "comm_s": stats.comm_s_total,
                     "steps": stats.steps}
        if stats.last_step is not None:
            self.steps.append(dataclasses.asdict(stats.last_step))


async def run_concurrency(engine, prompts, new_tokens: int, tag: str) -> dict:
    """Submit all prompts at once; wall time, time from the last first token, tokens."""
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    reqs = [
        GenerationRequest(
            tuple(p),
            SamplingParams(temperature=0.0),
            StoppingParams(max_new_tokens=new_tokens, ignore_eos=True),
            f"{tag}-{i}",
        )
        for i, p in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    streams = [engine.submit(r) for r in reqs]
    first = [None] * len(reqs)

    async def consume(i, s):
        toks = []
        async for ev in s:
            if ev.token_id is not None:
                if first[i] is None:
                    first[i] = time.perf_counter()
                toks.append(ev.token_id)
            if ev.result is not None:
                return ev.result.token_ids, time.perf_counter()
        raise RuntimeError("stream ended without a result")

    outs = await asyncio.gather(*(consume(i, s) for i, s in enumerate(streams)))
    t_end = max(t for _, t in outs)
    tokens = [t for t, _ in outs]
    gen = sum(map(len, tokens))
    t_first = max(first)
    return {
        "n": len(prompts),
        "total_s": t_end - t0,
        "generated": gen,
        "tok_s": gen / (t_end - t0),
        "decode_tok_s": (gen - len(prompts)) / max(1e-9, t_end - t_first),
        "ttft_max_s": t_first - t0,
        "tokens": tokens,
    }


async def engine_runs(
    model_dir: str,
    tp: int,
    threads: int,
    concurrency: list[int],
    prompts: list[list[int]],
    new_tokens: int,
) -> tuple[dict, StepStats]:
    from shardserve_server.engine.async_engine import AsyncEngine, EngineLimits
    from shardserve_server.workers.worker import WorkerConfig

    top = max(concurrency)
    cfg = WorkerConfig(
        model_dir,
        tp=tp,
        dtype="bfloat16",
        threads=threads,
        max_batch_size=top,
        kv_cache_tokens=max(4096, top * 256),
        pg_timeout_s=30.0,
    )
    stats = StepStats()
    engine = AsyncEngine(cfg, EngineLimits(hang_timeout_s=120.0), on_stats=stats)
    await engine.start()
    try:
        await run_concurrency(engine, prompts[: min(8, top)], 16, f"warm{tp}")  # warm-up
        res = {}
        for n in concurrency:
            n0 = len(stats.steps)
            before = dict(stats.last)
            r = await run_concurrency(engine, prompts[:n], new_tokens, f"tp{tp}n{n}")
            await asyncio.sleep(0.05)
            after = dict(stats.last)
            steps = [s for s in stats.steps[n0:] if s.get("decode_rows") == s.get("batch")]
            r["forward_s"] = after.get("forward_s", 0.0) - before.get("forward_s", 0.0)
            r["comm_s"] = after.get("comm_s", 0.0) - before.get("comm_s", 0.0)
            full = [s for s in steps if s.get("batch") == n] or steps
            if full:
                r["step_ms_med"] = 1e3 * statistics.median(s["step_s"] for s in full)
                r["comm_ms_med"] = 1e3 * statistics.median(s.get("comm_s", 0.0) for s in full)
                r["full_steps"] = len(full)
            res[n] = r
            print(
                f"  tp={tp} n={n}: {r['tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} "
                f"tok/s, total {r['total_s']:.2f} s, step {r.get('step_ms_med', 0):.1f} ms",
                flush=True,
            )
        return res, stats
    finally:
        await engine.shutdown()


def hf_runs(
    gguf: str, prompts: list[list[int]], concurrency: list[int], new_tokens: int, threads: int
) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {
                "gguf": gguf,
                "prompts": prompts,
                "concurrency": concurrency,
                "new_tokens": new_tokens,
            },
            f,
        )
    env = dict(
        os.environ,
        BENCH_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", HF_CHILD, f.name],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
    finally:
        os.unlink(f.name)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = {int(k): v for k, v in json.loads(line[len("RESULT ") :]).items()}
    for n, r in res.items():
        r["tok_s"] = n * new_tokens / r["total_s"]
        r["decode_tok_s"] = n * (new_tokens - 1) / max(1e-9, r["total_s"] - r["first_s"])
    return res


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """Sequences identical, and the mean share of the leading tokens that agree."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    lead = []
    for x, y in zip(a, b, strict=True):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        lead.append(k / max(1, len(x)))
    return same, sum(lead) / max(1, len(lead))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="/tmp/bb_smol")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tp-concurrency", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    ap.add_argument("--skip-tp", action="store_true", help="leave out the TP=3 run")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    conc = [int(x) for x in args.concurrency.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from shardserve_server.cli import bundled_gguf
    from shardserve_server.workers.model_dir import describe

    tok = describe(args.model_dir).tokenizer
    prompts = make_prompts(tok, max(conc + [args.tp_concurrency]))
    print(
        f"prompts: {len(prompts)}, {min(map(len, prompts))}-{max(map(len, prompts))} tokens",
        flush=True,
    )

    t0 = time.perf_counter()
    ours, _ = asyncio.run(
        engine_runs(args.model_dir, 1, args.threads, conc, prompts, args.new_tokens)
    )
    print(f"shardserve TP=1 done in {time.perf_counter() - t0:.0f} s", flush=True)
    hf = {}
    if not args.skip_hf:
        t0 = time.perf_counter()
        hf = hf_runs(str(bundled_gguf()), prompts, conc, args.new_tokens, args.threads)
        for n in conc:
            print(
                f"  transformers n={n}: {hf[n]['tok_s']:.1f} tok/s, decode "
                f"{hf[n]['decode_tok_s']:.1f} tok/s; ratio {ours[n]['tok_s'] / hf[n]['tok_s']:.2f}"
                f" (decode {ours[n]['decode_tok_s'] / hf[n]['decode_tok_s']:.2f})",
                flush=True,
            )
        print(f"transformers done in {time.perf_counter() - t0:.0f} s", flush=True)
    tp3 = None
    if not args.skip_tp:
        n = args.tp_concurrency
        tp3, _ = asyncio.run(engine_runs(args.model_dir, 3, 1, [n], prompts, args.new_tokens))
        tp3 = tp3[n]
        if n not in ours:
            extra, _ = asyncio.run(
                engine_runs(args.model_dir, 1, args.threads, [n], prompts, args.new_tokens)
            )
            ours[n] = extra[n]

    command = COMMAND if args.model_dir == "/tmp/bb_smol" else " ".join(
        [".venv/bin/python loadtest/bench_batching.py"] + sys.argv[1:])
    lines = header("Continuous batching: decode throughput (SmolLM2-135M bf16)", command)
    lines += [
        f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{args.new_tokens} new tokens each (greedy, ignore_eos), all submitted at once. "
        f"shardserve: `AsyncEngine`, one worker group, TP=1, {args.threads} threads, bf16. "
        f"transformers: static batched `generate`, bf16, left padding, {args.threads} threads, "
        "in a separate process. tok/s = generated tokens / wall time (prefill included); "
        "decode tok/s excludes the start (see the script's docstring).",
        "",
        "| concurrent | shardserve tok/s | decode tok/s | step ms (median) | transformers tok/s "
        "| decode tok/s | ratio | decode ratio | greedy seqs equal to HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in conc:
        o = ours[n]
        row = [
            str(n),
            f"{o['tok_s']:.1f}",
            f"{o['decode_tok_s']:.1f}",
            f"{o.get('step_ms_med', float('nan')):.1f}",
        ]
        if hf:
            h = hf[n]
            same, lead = agreement(o["tokens"], h["tokens"])
            row += [
                f"{h['tok_s']:.1f}",
                f"{h['decode_tok_s']:.1f}",
                f"{o['tok_s'] / h['tok_s']:.2f}x",
                f"{o['decode_tok_s'] / h['decode_tok_s']:.2f}x",
                f"{same}/{n} (leading tokens {100 * lead:.0f}%)",
            ]
        else:
            row += ["-"] * 5
        lines.append("| " + " | ".join(row) + " |")
    if hf and 32 in ours:
        r = ours[32]["tok_s"] / hf[32]["tok_s"]
        lines += [
            "",
            f"Target: 32 concurrent >= 1.5x transformers at batch 32: "
            f"{r:.2f}x -> {'met' if r >= 1.5 else 'NOT met'}.",
        ]
    if tp3 is not None:
        n = args.tp_concurrency
        one = ours[n]
        same, lead = agreement(one["tokens"], tp3["tokens"])
        share = tp3["comm_s"] / max(1e-9, tp3["forward_s"])
        step_share = tp3.get("comm_ms_med", 0.0) / max(1e-9, tp3.get("step_ms_med", 1.0))
        lines += [
            "",
            f"## TP=3 vs TP=1 at {n} concurrent sequences (same {os.cpu_count()} cores)",
            "",
            "TP=3: three rank processes, 1 thread each, gloo collectives. All-reduce share: the "
            "leader's (rank 0) time inside collectives (`comm_s`, which includes waiting for "
            "the other ranks) over its forward time (`forward_s`) during the run, and per full "
            "decode step (median `last_step`).",
            "",
            "| config | tok/s | decode tok/s | step ms (median) | all-reduce ms/step "
            "| all-reduce share of forward |",
            "|---|---|---|---|---|---|",
            f"| TP=1, {args.threads} threads | {one['tok_s']:.1f} | {one['decode_tok_s']:.1f} | "
            f"{one.get('step_ms_med', float('nan')):.1f} | 0 | 0% |",
            f"| TP=3, 1 thread/rank | {tp3['tok_s']:.1f} | {tp3['decode_tok_s']:.1f} | "
            f"{tp3.get('step_ms_med', float('nan')):.1f} | {tp3.get('comm_ms_med', 0):.1f} | "
            f"{100 * share:.0f}% (per step {100 * step_share:.0f}%) |",
            "",
            f"TP=3 / TP=1: {tp3['tok_s'] / one['tok_s']:.2f}x. Greedy tokens TP=3 vs TP=1 "
            f"(bf16): {same}/{n} sequences identical, leading tokens agree "
            f"{100 * lead:.0f}%.",
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results("batching", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
