"""Greedy SmolLM2 bf16 generations with and without the fused kernels: same bits?

    .venv/bin/python loadtest/fused_ops_equality.py [--model models/smollm2-135m]
        [--new-tokens 32] [--threads 1]

Runs a fixed set of prompts (ragged lengths, batched together: prompt chunks and decode rows
in FLAT steps) through the group leader's loop in-process (GroupScheduler + ModelRunner, TP=1)
twice: with the fused RMSNorm / rotary / SiLU kernels (sharding/.../models/fused_ops.py) and
with plain torch ops. Prints whether every forward's logits are bit-identical and whether the
greedy tokens agree; exit code 1 if not.
"""

from __future__ import annotations

import argparse
import sys
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
from shardserve_sharding.models import fused_ops  # noqa: E402
from shardserve_sharding.sharded_load import load_sharded_model  # noqa: E402
from shardserve_sharding.tokenizer import TokenizerBundle  # noqa: E402
from shardserve_sharding.tp.comm import ThreadGroup  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain in two sentences why the sky is blue.",
    "1, 1, 2, 3, 5, 8,",
    "Translate to German: The weather is nice today, and we are going for a walk in the park.",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
)


def generate(model, tok, new_tokens: int) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    """Every forward's logits and each prompt's greedy tokens."""
    runner = ModelRunner(model, CacheGeometry(4096, 16, len(PROMPTS)), torch.bfloat16)
    cfg = SchedulerConfig(max_batch_size=len(PROMPTS), kv_cache_tokens=4096, block_size=16,
                          flat_batches=runner.flat_batches)
    sched = GroupScheduler(cfg, family=model.family, tokenizer=tok,
                           eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=2048)
    for i, text in enumerate(PROMPTS):
        sched.add(GenerationRequest(tuple(tok.encode(text)), SamplingParams(temperature=0.0),
                                    StoppingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                    f"p{i}"))
    logits_seen: list[torch.Tensor] = []
    tokens: dict[str, list[int]] = {f"p{i}": [] for i in range(len(PROMPTS))}
    while sched.has_work():
        sched.reap()
        for plan, rows, samples in sched.schedule():
            logits = runner.forward(plan)  # [R, V] fp32
            logits_seen.append(logits.clone())
            for out in sched.run([(plan, rows, samples)], lambda _p, x=logits: x):
                if out.token_id is not None:
                    tokens[out.request_id].append(out.token_id)
    return logits_seen, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if fused_ops.kernels() is None:
        print("the fused kernels are not built here (disabled or no compiler): nothing to compare")
        return 1
    tok = TokenizerBundle.load(Path(a.model) / "tokenizer")
    model = load_sharded_model(a.model, ThreadGroup(1).comm(0), dtype=torch.bfloat16)
    built = fused_ops.kernels()
    fused_logits, fused_tokens = generate(model, tok, a.new_tokens)
    fused_ops._STATE["mod"] = None  # the plain torch path from here on
    plain_logits, plain_tokens = generate(model, tok, a.new_tokens)
    fused_ops._STATE["mod"] = built
    same_bits = len(fused_logits) == len(plain_logits) and all(
        torch.equal(x, y) for x, y in zip(fused_logits, plain_logits, strict=True))
    same_tokens = fused_tokens == plain_tokens
    n_tok = sum(len(v) for v in fused_tokens.values())
    print(f"cpu: {cpu_flags()}  torch {torch.__version__}  threads {a.threads}  bf16")
    print(f"{len(PROMPTS)} prompts, {n_tok} greedy tokens, {len(fused_logits)} forwards: "
          f"logits bit-identical {same_bits}, greedy tokens identical {same_tokens}")
    for rid, ids in fused_tokens.items():
        print(f"  {rid}: {tok.decode(ids)!r}")
    return 0 if same_bits and same_tokens else 1


if __name__ == "__main__":
    raise SystemExit(main())
