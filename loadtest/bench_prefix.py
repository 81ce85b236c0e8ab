"""Benchmark: automatic prefix caching on a shared-system-prompt workload (issue 17).

    .venv/bin/python loadtest/bench_prefix.py [--servers on,off] [--streams 16]
        [--seconds 40] [--repeats 2] [--new-tokens 16] [--note TEXT]

With vLLM CPU as the peer (its prefix caching on, as vLLM v1 has it by default), on a quiet
machine (it needs both cores; see loadtest/bench_vs_vllm.py for the install recipe, which is
applied to --vllm-venv when vLLM is missing there):

    .venv/bin/python loadtest/bench_prefix.py --servers on,off,vllm --vllm-venv /work/vllm-venv

Workloads, each driven through the servers' OpenAI /v1/completions SSE with the same client
code (loadtest/bench_vs_vllm.py's), --streams closed-loop streams, greedy, EOS ignored:

- shared: every request is one ~1,000-token system prompt (the same for all) followed by a
  short user turn of its own (~20 tokens) -- a chat service's shape. Reported: TTFT p50/p99
  and tok/s. Targets: TTFT p50 with the cache on at least 3x lower than with it off, and no
  higher than vLLM's (when vLLM ran).
- unique: the same lengths, but every request's prompt starts with its own number (its first
  KV block differs: the cache can never hit). Target: throughput with the cache on within 3%
  of the cache off (the block hashing costs nothing measurable).

Servers: `on` is `shardserve serve --dtype bf16` (prefix caching is on by default), `off` adds
--no-prefix-caching, `vllm` is `vllm serve HF_DIR --dtype bfloat16` of `shardserve export-hf`
of the same checkpoint. Each server runs alone with the client; the order alternates by
repeat; medians over the repeats, every window listed with the load average it saw. Writes
loadtest/results/prefix_cache.md (or --out NAME).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import bench_vs_vllm as bv
from results_io import cpu_flags, header, write_results
from stream_stats import window_stats

SYSTEM_TOKENS = 1000
TURN_TOKENS = 20
SKIP = 0.2
TOPICS = bv.WORDS


def system_prompt(tok, tag: str = "") -> str:
    """~SYSTEM_TOKENS tokens of instructions (seeded words); `tag` first makes it unique."""
    rng = random.Random(17)
    words = [rng.choice(TOPICS) for _ in range(SYSTEM_TOKENS * 2)]
    ids = tok.encode(tag + "You are a helpful assistant. Rules: " + " ".join(words),
                     add_special_tokens=False)
    return tok.decode(ids[:SYSTEM_TOKENS])


def prompts(tok, n: int, shared: bool) -> list[str]:
    """n prompts: system prompt (shared, or each its own) + a distinct short user turn."""
    rng = random.Random(5)
    base = system_prompt(tok)
    out = []
    for k in range(n):
        turn = " ".join(rng.choice(TOPICS) for _ in range(TURN_TOKENS - 8))
        sys_part = base if shared else system_prompt(tok, f"Session {k}. ")
        out.append(f"{sys_part}\nUser {k}: tell me about {turn}\nAssistant:")
    return out


async def measure(url: str, workloads: dict[str, list[str]], args) -> dict[str, tuple]:
    import aiohttp

    out = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=900)) as s:
        send = bv.sse_client(s, url, args.new_tokens)
        for name, ps in workloads.items():
            if args.warmup_seconds > 0:  # fills the cache with the system prompt, warms shapes
                await bv.run_window(send, ps, 10_000, args.streams, args.warmup_seconds)
            load0 = bv.loadavg()
            reqs, t0, t1, _ = await bv.run_window(send, ps, 0, args.streams, args.seconds)
            st = window_stats(reqs, t0, t1, SKIP, args.new_tokens)
            p = [r.prompt_tokens for r in reqs if r.prompt_tokens]
            out[name] = (st, max(load0, bv.loadavg()), statistics.mean(p) if p else 0.0)
            await asyncio.sleep(args.pause)
    return out


def hashing_cost(tok, n: int = 64) -> list[str]:
    """What prefix caching adds per request with no hit possible: the scheduler's lookup at
    admission, the keys of the blocks it will prefill, and their registration once computed
    (BlockAllocator, as GroupScheduler calls it), timed on the unique workload's prompts."""
    from shardserve_server.engine.block_pool import BlockAllocator, prefix_keys

    bs = 16
    ids = [tok.encode(p) for p in prompts(tok, n, False)]
    alloc = BlockAllocator(4096, bs, prefix_caching=True)
    times = []
    for x in ids:
        full = (len(x) - 1) // bs
        table = alloc.allocate(alloc.blocks_for(len(x)))
        t0 = time.perf_counter()
        hits, key = alloc.lookup(x, full)
        prefix_keys(x[len(hits) * bs:], bs, full - len(hits), parent=key)
        alloc.register(table, x, len(hits), key)
        times.append(time.perf_counter() - t0)
        alloc.free(table)
    per = statistics.median(times)
    return [f"Prefix-cache bookkeeping per request on the unique workload (lookup, keys, "
            f"registration of ~{statistics.mean(map(len, ids)):.0f}-token prompts, "
            f"{bs}-token blocks, median of {n}): {per * 1e6:.0f} us."]


def engine_ab(model_dir: Path, tok, args) -> list[str]:
    """The unique workload inside one process: a cache-on and a cache-off GroupScheduler
    (their own KV caches, one model) side by side, one step each in turn (order swapped every
    step), each keeping --streams requests running until it has served --engine-requests;
    the same prompts and greedy tokens, so their step times compare the same work."""
    import torch

    from shardserve_server.engine.runner import CacheGeometry, ModelRunner
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams
    from shardserve_sharding.sharded_load import load_sharded_model
    from shardserve_sharding.tp.comm import ThreadGroup

    torch.set_num_threads(args.engine_threads)
    model = load_sharded_model(model_dir, ThreadGroup(1).comm(0), dtype=torch.bfloat16)
    ids = [tuple(tok.encode(p)) for p in prompts(tok, args.engine_requests, False)]
    stop = StoppingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for window in range(args.engine_windows):
        side = {}
        for caching in (True, False):
            cfg = SchedulerConfig(max_batch_size=args.streams, kv_cache_tokens=32768,
                                  block_size=16, prefix_caching=caching, flat_batches=True)
            sched = GroupScheduler(cfg, family="llama", tokenizer=tok,
                                   eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=2048)
            runner = ModelRunner(model, CacheGeometry(32768, 16, args.streams), torch.bfloat16)
            if args.engine_touch:
                # the pool is calloc'd: its pages fault in on first write. The cache-on side
                # spreads new blocks over the whole pool (freed blocks stay cached), the
                # cache-off side reuses the same few, so a fresh pool charges the first pass
                # of page faults to caching; a long-running server pays it once.
                runner.cache.kv.zero_()
            side[caching] = {"sched": sched, "runner": runner, "next": 0, "done": 0, "s": 0.0}
        k = 0
        while any(x["done"] < len(ids) for x in side.values()):
            for caching in ((True, False) if k % 2 == 0 else (False, True)):
                x = side[caching]
                sched = x["sched"]
                while x["next"] < len(ids) and x["next"] - x["done"] < args.streams:
                    sched.add(GenerationRequest(ids[x["next"]], SamplingParams(temperature=0),
                                                stop, f"r{x['next']}"))
                    x["next"] += 1
                if not sched.has_work():
                    continue
                t0 = time.perf_counter()
                for o in sched.step(x["runner"].forward):
                    x["done"] += o.result is not None
                x["s"] += time.perf_counter() - t0
            k += 1
        on, off = side[True]["s"], side[False]["s"]
        rows.append((window, on, off))
        print(f"  engine window {window + 1}: cache on {on:.1f} s, off {off:.1f} s, "
              f"off/on {off / on:.3f}", flush=True)
    ratio = statistics.median(off / on for _, on, off in rows)
    out = ["## The no-shared-prefix workload in one process, cache on and off side by side",
           "", f"{args.engine_requests} requests of the unique workload, {args.streams} at a "
           f"time, {args.new_tokens} new tokens, greedy; bf16, {args.engine_threads} "
           f"thread(s); KV pools touched before timing: {'yes' if args.engine_touch else 'no'}; "
           "the schedulers alternate steps, so the machine's drifts hit both. "
           "Step time for the same work, cache on vs off (throughput ratio = off/on time):",
           "", f"Median throughput cache on / off = {ratio:.3f} (target within 3%: "
           f"{'met' if ratio >= 0.97 else '**missed**'}).", "",
           "| window | cache on s | cache off s | on / off throughput |", "|---|---|---|---|"]
    out += [f"| {w + 1} | {on:.2f} | {off:.2f} | {off / on:.3f} |" for w, on, off in rows]
    return out


def make_servers(names: list[str], model: Path, args) -> dict[str, bv.Server]:
    servers = {}
    base = args.shardserve_args
    for name in names:
        if name in ("on", "off"):
            a = argparse.Namespace(**vars(args))
            a.shardserve_args = base + (" --no-prefix-caching" if name == "off" else "")
            servers[name] = bv.shardserve_server(model, True, a)
        elif name == "vllm":
            venv = Path(args.vllm_venv)
            args.versions["vLLM"] = bv.ensure_vllm(venv, not args.no_install)
            servers[name] = bv.vllm_server(venv, bv.exported(model), args)
        else:
            raise SystemExit(f"--servers: unknown server {name!r} (on, off, vllm)")
    return servers


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


LABEL = {"on": "shardserve, cache on", "off": "shardserve, cache off",
         "vllm": "vLLM CPU, prefix caching on"}


def report(runs: list[tuple[int, str, str, object, float]], args, command: str,
           wall_s: float) -> list[str]:
    lines = header("Prefix caching: shared system prompt, cache on vs off (and vLLM)", command)
    if args.note:
        lines += [f"**{args.note}**", ""]
    cores = len(os.sched_getaffinity(0))
    busy = [r for r in runs if r[4] > cores + 0.5]
    if busy:
        lines += [f"**{len(busy)} of {len(runs)} windows saw a load average above "
                  f"{cores + 0.5:g} on {cores} cores (up to {max(r[4] for r in busy):.1f}): the "
                  "machine was shared with other work; the ratios are leads, not a "
                  "measurement.**", ""]
    lines += [f"CPU flags: `{cpu_flags()}`; " + "; ".join(
        f"{k}: {v}" for k, v in args.versions.items()) + "  ",
        f"shardserve: `shardserve serve --model DIR --dtype bf16 {args.shardserve_args}` "
        "(off: plus --no-prefix-caching)  ",
        f"Load: {args.streams} closed-loop streams over /v1/completions SSE; prompts of a "
        f"~{SYSTEM_TOKENS}-token system prompt + a ~{TURN_TOKENS}-token user turn; "
        f"{args.new_tokens} new tokens, greedy, EOS ignored; windows of {args.seconds:g} s "
        f"(first {SKIP:.0%} not counted) after a {args.warmup_seconds:g} s warm-up per "
        f"workload; {args.repeats} repeat(s), server order alternating. Whole run "
        f"{wall_s / 60:.1f} min.", "",
        "Medians over the repeats:", "",
        "| server | workload | TTFT p50 ms | TTFT p99 ms | tok/s | ITL p50 ms |",
        "|---|---|---|---|---|---|"]

    def med(server: str, wl: str, key: str) -> float:
        xs = [getattr(r[3], key) for r in runs if r[1] == server and r[2] == wl]
        return statistics.median(xs) if xs else float("nan")

    names = list(dict.fromkeys(r[1] for r in runs))
    for wl in ("shared", "unique"):
        for s in names:
            if not any(r[1] == s and r[2] == wl for r in runs):
                continue  # a workload not run (--workloads)
            lines.append(f"| {LABEL[s]} | {wl} | {med(s, wl, 'ttft_p50') * 1e3:.0f} | "
                         f"{med(s, wl, 'ttft_p99') * 1e3:.0f} | {med(s, wl, 'tok_s'):.1f} | "
                         f"{med(s, wl, 'itl_p50') * 1e3:.1f} |")
    lines += ["", "Targets:", ""]
    if {"on", "off"} <= set(names):
        r = _div(med("off", "shared", "ttft_p50"), med("on", "shared", "ttft_p50"))
        lines.append(f"- shared prefix: TTFT p50 cache off / on = {r:.2f}x (target >= 3x: "
                     f"{'met' if r >= 3 else '**missed**'})")
        t = _div(med("on", "unique", "tok_s"), med("off", "unique", "tok_s"))
        if t == t:  # not NaN: the unique workload ran
            lines.append(f"- no shared prefix: tok/s cache on / off = {t:.3f} (target within "
                         f"3%: {'met' if t >= 0.97 else '**missed**'})")
        else:
            lines.append("- no shared prefix: not run here (--workloads shared)")
    if {"on", "vllm"} <= set(names):
        a, b = med("on", "shared", "ttft_p50"), med("vllm", "shared", "ttft_p50")
        lines.append(f"- shared prefix: TTFT p50 {a * 1e3:.0f} ms vs vLLM {b * 1e3:.0f} ms "
                     f"(target <=: {'met' if a <= b else '**missed**'})")
    else:
        lines.append("- vs vLLM: not run here (run with --servers on,off,vllm on a quiet "
                     "machine)")
    lines += ["", "Every window:", "",
              "| repeat | server | workload | TTFT p50 ms | TTFT p99 ms | tok/s | done | "
              "prompt tokens | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for rep, s, wl, st, load in runs:
        lines.append(f"| {rep + 1} | {LABEL[s]} | {wl} | {st.ttft_p50 * 1e3:.0f} | "
                     f"{st.ttft_p99 * 1e3:.0f} | {st.tok_s:.1f} | {st.completed} | "
                     f"{args.prompt_tokens.get((s, wl), 0):.0f} | {load:.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--servers", default="on,off",
                    help="comma-separated: on (cache on), off (--no-prefix-caching), vllm; "
                    "none: only the bookkeeping timing")
    ap.add_argument("--model", help="shardserve checkpoint (default: the bundled SmolLM2)")
    ap.add_argument("--streams", type=int, default=16, help="closed-loop streams")
    ap.add_argument("--seconds", type=float, default=40.0, help="measured window per workload")
    ap.add_argument("--warmup-seconds", type=float, default=10.0, help="unrecorded warm-up")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between windows")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--workloads", default="shared,unique", help="shared, unique or both")
    ap.add_argument("--shardserve-args", default="--kv-cache-tokens 32768",
                    help="extra `shardserve serve` arguments (both cache settings)")
    ap.add_argument("--vllm-venv", default=os.environ.get(
        "SHARDSERVE_VLLM_VENV", str(Path.home() / ".cache" / "shardserve" / "vllm-venv")),
        help="venv holding vLLM CPU (installed there if missing, never under CI)")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing vLLM")
    ap.add_argument("--vllm-args", default="--enable-prefix-caching",
                    help="extra `vllm serve` arguments")
    ap.add_argument("--vllm-bind", default=bv.cpu_bind(), help="VLLM_CPU_OMP_THREADS_BIND")
    ap.add_argument("--vllm-kv-gib", type=float, default=4.0, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="server start limit")
    ap.add_argument("--engine-windows", type=int, default=0,
                    help="also run the unique workload in-process, cache on and off side by "
                    "side, this many windows (0: skip)")
    ap.add_argument("--engine-requests", type=int, default=32,
                    help="requests per in-process window")
    ap.add_argument("--engine-threads", type=int, default=1, help="torch threads in-process")
    ap.add_argument("--engine-touch", action="store_true",
                    help="write the fresh KV pools once before timing (steady state of a "
                    "server whose pool has been used; without it the first-touch page faults "
                    "count)")
    ap.add_argument("--note", default="", help="a line for the results file")
    ap.add_argument("--out", default="prefix_cache", help="results file name")
    args = ap.parse_args()
    command = "python loadtest/bench_prefix.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t_start = time.monotonic()
    from shardserve_sharding.tokenizer import TokenizerBundle

    model = Path(args.model) if args.model else bv.bundled_checkpoint()
    tok = TokenizerBundle.load(model / "tokenizer")
    args.versions = {}
    args.prompt_tokens = {}
    wls = args.workloads.split(",")
    n = 4000
    workloads = {w: prompts(tok, n, w == "shared") for w in wls}
    hashing = hashing_cost(tok)
    print(hashing[0], flush=True)
    if args.engine_windows:
        hashing += ["", *engine_ab(model, tok, args)]
    names = [x for x in args.servers.split(",") if x and x != "none"]
    servers = make_servers(names, model, args)
    runs = []
    order = list(servers)
    for rep in range(args.repeats):
        for name in (order if rep % 2 == 0 else order[::-1]):
            print(f"repeat {rep + 1}: {LABEL[name]}", flush=True)
            proc, targets = servers[name].start(rep)
            try:
                url = next(t.url for t in targets if t.url)
                res = asyncio.run(measure(url, workloads, args))
            finally:
                proc.stop()
            for wl, (st, load, ptoks) in res.items():
                runs.append((rep, name, wl, st, load))
                args.prompt_tokens[(name, wl)] = ptoks
                print(f"  {wl:7s}: TTFT p50 {st.ttft_p50 * 1e3:7.0f} ms p99 "
                      f"{st.ttft_p99 * 1e3:7.0f} ms, {st.tok_s:6.1f} tok/s, "
                      f"{st.completed} done (load {load:.1f})", flush=True)
    lines = report(runs, args, command, time.monotonic() - t_start) if runs else header(
        "Prefix caching: bookkeeping cost", command)
    text = write_results(args.out, lines + ["", *hashing])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
