"""Where a worker step's time goes: SmolLM2 bf16, 32 rows, ~100-token prompts, 64 new tokens.

    .venv/bin/python loadtest/profile_step.py [--model models/smollm2-135m] [--rows 32]
        [--prompt-tokens 100] [--new-tokens 64] [--threads 2] [--dtype bf16] [--top 25]
        [--clock cpu] [--temperature 0.8 --top-p 0.9]

Runs the group leader's loop in-process (GroupScheduler + ModelRunner, TP=1, no IPC), times
schedule / forward / process per step (prefill steps and decode steps apart), then profiles
a few decode forwards with torch.profiler and prints the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_io import cpu_flags  # noqa: E402

from shardserve_server.engine.runner import CacheGeometry, ModelRunner  # noqa: E402
from shardserve_server.engine.sampling import SamplingParams  # noqa: E402
from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig  # noqa: E402
from shardserve_server.engine.sequence import GenerationRequest  # noqa: E402
from shardserve_server.engine.stopping import StoppingParams  # noqa: E402
from shardserve_sharding.checkpoint.io import DTYPES  # noqa: E402
from shardserve_sharding.sharded_load import load_sharded_model  # noqa: E402
from shardserve_sharding.tokenizer import TokenizerBundle  # noqa: E402
from shardserve_sharding.tp.comm import ThreadGroup  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory")
    ap.add_argument("--rows", type=int, default=32, help="concurrent sequences")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="prompt length")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--dtype", default="bf16", help="fp32 or bf16")
    ap.add_argument("--top", type=int, default=25, help="operators listed")
    ap.add_argument("--padded", action="store_true",
                    help="padded prefill and decode forwards instead of one flat forward")
    ap.add_argument("--no-profile", action="store_true", help="skip the operator table")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature of every row (0: greedy); sampled rows are "
                         "seeded (row i: seed i)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's top_p")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by wall clock, or by this process's CPU time (steadier on "
                         "a busy machine with --threads 1; with 2 threads it counts both)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    dtype = DTYPES[{"bf16": "bfloat16", "fp32": "float32"}.get(a.dtype, a.dtype)]
    tok = TokenizerBundle.load(Path(a.model) / "tokenizer")
    model = load_sharded_model(a.model, ThreadGroup(1).comm(0), dtype=dtype)
    runner = ModelRunner(model, CacheGeometry(16384, 16, a.rows), dtype)
    cfg = SchedulerConfig(max_batch_size=a.rows, kv_cache_tokens=16384, block_size=16,
                          flat_batches=runner.flat_batches and not a.padded)
    sched = GroupScheduler(cfg, family=model.family, tokenizer=tok,
                           eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=2048)
    g = torch.Generator().manual_seed(0)
    for i in range(a.rows):
        ids = torch.randint(100, 40000, (a.prompt_tokens,), generator=g).tolist()
        sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p,
                                  seed=i if a.temperature > 0 else None)
        sched.add(GenerationRequest(tuple(ids), sampling,
                                    StoppingParams(max_new_tokens=a.new_tokens, ignore_eos=True),
                                    f"r{i}"))
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    parts: dict[str, list[float]] = {"schedule": [], "forward": [], "process": []}
    profiled = a.no_profile
    while sched.has_work():
        t0 = clock()
        sched.reap()
        plans = sched.schedule()
        t1 = clock()
        tf = tp = 0.0
        for plan, rows, samples in plans:
            decode = int(plan.num_new.max()) == 1 and len(rows) == a.rows
            if decode and not profiled and sched.step_count > 20:
                profiled = True
                cpu = [torch.profiler.ProfilerActivity.CPU]
                with torch.profiler.profile(activities=cpu) as prof:
                    for _ in range(3):
                        runner.forward(plan)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
            s0 = clock()
            logits = runner.forward(plan)
            s1 = clock()
            sched.run([(plan, rows, samples)], lambda _plan, x=logits: x)  # process only
            s2 = clock()
            tf += s1 - s0
            tp += s2 - s1
        if plans:
            kind = "decode" if all(int(p.num_new.max()) == 1 for p, _, _ in plans) else "prefill"
            if kind == "decode" and sum(len(r) for _, r, _ in plans) == a.rows:
                parts["schedule"].append(t1 - t0)
                parts["forward"].append(tf)
                parts["process"].append(tp)
            times[kind].append(clock() - t0)
    print(f"cpu: {cpu_flags()}  torch {torch.__version__}  threads {a.threads}  {a.dtype}  "
          f"clock {a.clock}  temperature {a.temperature}  top_p {a.top_p}")
    for k, v in times.items():
        if v:
            print(f"{k}: {len(v)} steps, median {1e3 * statistics.median(v):.1f} ms, "
                  f"total {sum(v):.2f} s")
    for k, v in parts.items():
        if v:
            print(f"  full-batch decode {k}: median {1e3 * statistics.median(v):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
