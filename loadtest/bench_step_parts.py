"""Where a decode forward's time goes, part by part: GEMMs, decode attention, fused small ops.

    .venv/bin/python loadtest/bench_step_parts.py [--model models/smollm2-135m] [--rows 1,32]
        [--threads 1] [--clock cpu] [--new-tokens 48] [--attention-only]

For each row count: the group leader's loop in-process (GroupScheduler + ModelRunner, TP=1,
bf16, ~100-token prompts, greedy), and for every full-batch decode forward after the first few
the time spent in cpu_linear (every GEMM, whichever kernel it picks), in the attention step of
the paged cache (of which the C++ kernel call), in the fused RMSNorm / rotary / SiLU kernels,
and the rest (Python, views, embedding). Each part is timed around its call with the chosen
clock (`cpu`: this process's CPU time, steadier on a shared machine with one thread).

`--prefill` times the forwards that carry prompt chunks instead (the first steps: --rows
~100-token prompts read in 512-token steps), as a loaded server runs them when requests arrive.

`--attention-only` instead times the decode attention kernel alone on SmolLM2's shapes (32
rows x 150 keys, 16-slot blocks at random places), over one pool (hot) and over 30 pools of
a layer's size each (cold, as a forward's 30 layers read them).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_io import cpu_flags  # noqa: E402

from shardserve_server.engine import decode_attention, paged_cache  # noqa: E402
from shardserve_server.engine.runner import CacheGeometry, ModelRunner  # noqa: E402
from shardserve_server.engine.sampling import SamplingParams  # noqa: E402
from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig  # noqa: E402
from shardserve_server.engine.sequence import GenerationRequest  # noqa: E402
from shardserve_server.engine.stopping import StoppingParams  # noqa: E402
from shardserve_sharding.models import fused_ops, llama  # noqa: E402
from shardserve_sharding.sharded_load import load_sharded_model  # noqa: E402
from shardserve_sharding.tokenizer import TokenizerBundle  # noqa: E402
from shardserve_sharding.tp import layers as tp_layers  # noqa: E402
from shardserve_sharding.tp.comm import ThreadGroup  # noqa: E402


class Parts:
    """Accumulated seconds per part while `on`."""

    def __init__(self, clock) -> None:
        self.clock, self.on = clock, False
        self.s: dict[str, float] = collections.defaultdict(float)

    def timed(self, fn, part: str):
        def run(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t = self.clock()
            try:
                return fn(*a, **k)
            finally:
                self.s[part] += self.clock() - t
        return run


def instrument(clock) -> Parts:
    """Wrap the parts' entry points (once per process) with timers; returns their totals."""
    parts = Parts(clock)
    # GEMMs: every linear layer reaches cpu_linear through one of these module globals
    for mod in (llama, tp_layers):
        mod.cpu_linear = parts.timed(mod.cpu_linear, "GEMMs")
    kern = decode_attention.step_kernel()
    if kern is not None:
        timed_kern = parts.timed(kern, "attention kernel")
        decode_attention.step_kernel = lambda: timed_kern
    qkv_kern = decode_attention.qkv_kernel()
    if qkv_kern is not None:
        timed_qkv = parts.timed(qkv_kern, "attention kernel")
        decode_attention.qkv_kernel = lambda: timed_qkv
    cache_cls = paged_cache.PagedKVCache
    cache_cls.run_attention = parts.timed(cache_cls.run_attention, "attention step")
    cache_cls.attend_qkv = parts.timed(cache_cls.attend_qkv, "attention step")
    fused = fused_ops.kernels()
    if fused is not None:
        class Timed:
            def __getattr__(self, name):
                return parts.timed(getattr(fused, name), "fused ops")
        timed_fused = Timed()
        fused_ops.kernels = lambda: timed_fused
    return parts


def forward_parts(model_dir: str, rows: int, new_tokens: int, parts: Parts,
                  prefill: bool = False) -> str:
    clock = parts.clock
    parts.s.clear()
    tok = TokenizerBundle.load(Path(model_dir) / "tokenizer")
    model = load_sharded_model(model_dir, ThreadGroup(1).comm(0), dtype=torch.bfloat16)
    runner = ModelRunner(model, CacheGeometry(16384, 16, rows), torch.bfloat16)
    cfg = SchedulerConfig(max_batch_size=rows, kv_cache_tokens=16384, block_size=16,
                          flat_batches=runner.flat_batches)
    sched = GroupScheduler(cfg, family=model.family, tokenizer=tok,
                           eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=2048)
    g = torch.Generator().manual_seed(0)
    for i in range(rows):
        ids = torch.randint(100, 40000, (100,), generator=g).tolist()
        sched.add(GenerationRequest(tuple(ids), SamplingParams(temperature=0.0),
                                    StoppingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                    f"r{i}"))
    forwards: list[float] = []
    while sched.has_work():
        sched.reap()
        for plan, prow, samples in sched.schedule():
            if prefill:  # every step with prompt tokens (the first is a warm-up)
                parts.on = int(plan.num_new.max()) > 1 and sched.step_count > 1
            else:
                parts.on = (int(plan.num_new.max()) == 1 and len(prow) == rows
                            and sched.step_count > 5)
            t = clock()
            logits = runner.forward(plan)
            if parts.on:
                forwards.append(clock() - t)
            parts.on = False
            sched.run([(plan, prow, samples)], lambda _p, x=logits: x)
    n = len(forwards)
    total = sum(forwards)
    s = parts.s
    other = total - s["GEMMs"] - s["attention step"] - s["fused ops"]
    rows_out = [("forward", total), ("GEMMs", s["GEMMs"]),
                ("attention step", s["attention step"]),
                ("  of which the kernel", s["attention kernel"]),
                ("fused ops", s["fused ops"]), ("other (Python, views, embedding)", other)]
    kind = "prompt-chunk" if prefill else "full-batch decode"
    out = [f"rows {rows}: {n} {kind} forwards, median "
           f"{1e3 * statistics.median(forwards):.2f} ms", "", "| part | ms per forward | share |",
           "|---|---|---|"]
    out += [f"| {k} | {1e3 * v / n:.2f} | {v / total:.0%} |" for k, v in rows_out]
    return "\n".join(out)


def attention_only(clock) -> str:
    kern = decode_attention.kernel()
    if kern is None:
        return "decode attention kernel not built here"
    r, h, hkv, d, bs, keys, nblocks = 32, 9, 3, 64, 16, 150, 1024
    nb = (keys + bs - 1) // bs
    lens = torch.full((r,), keys, dtype=torch.long)
    q = torch.randn(r, h, d, dtype=torch.bfloat16)  # [R, H, D]

    def pool():
        p = torch.randn(nblocks * bs, 2, hkv, d, dtype=torch.bfloat16)  # [slots, 2, Hkv, D]
        return p, torch.randperm(nblocks)[: r * nb].view(r, nb).contiguous()

    hot = pool()
    sets = {"hot (one pool)": [hot] * 30, "cold (30 pools)": [pool() for _ in range(30)]}
    out = []
    for name, pools in sets.items():
        per = []
        for _ in range(10):
            t = clock()
            for p, tables in pools:
                kern(q, p, tables, lens, bs, d ** -0.5)
            per.append((clock() - t) / len(pools))
        out.append(f"{name}: {1e6 * statistics.median(per):.0f} us a layer (32 rows x 150 keys)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory")
    ap.add_argument("--rows", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                    help="wall clock, or this process's CPU time (counts every thread)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens generated per row")
    ap.add_argument("--prefill", action="store_true",
                    help="time the forwards with prompt chunks, not the decode forwards")
    ap.add_argument("--attention-only", action="store_true",
                    help="time the decode attention kernel alone, hot and cold")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    print(f"cpu: {cpu_flags()}  torch {torch.__version__}  threads {a.threads}  clock {a.clock}")
    with torch.inference_mode():
        if a.attention_only:
            print(attention_only(clock))
            return 0
        parts = instrument(clock)
        for rows in (int(x) for x in a.rows.split(",")):
            print(forward_parts(a.model, rows, a.new_tokens, parts, a.prefill))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
