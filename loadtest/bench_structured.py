"""Benchmark: structured output -- the grammar libraries' per-step mask cost, and what one
constrained row costs the free rows of its batch (issue 17).

    .venv/bin/python loadtest/bench_structured.py [--part mask,batch] [--model DIR]
        [--rows 8] [--steps 48] [--repeats 5]

--part mask: every installed candidate (xgrammar, the one shardserve uses; llguidance and
outlines-core if installed: `pip install -c constraints.txt llguidance outlines-core`)
compiles one nested JSON schema against the served tokenizer (SmolLM2: 49,152 tokens) and
then walks a valid instance token by token, timing the next-token mask before every token
(median, p90, max over the walk, all walks pooled) and the compile.

--part batch: the GroupScheduler over the model in this process (bf16), a batch of --rows
free rows (seeded, temperature 1, EOS ignored) plus one more row, which is either free too
(A) or constrained by the JSON schema (B). A and B run side by side, one decode step each in
turn, for --steps tokens; the free rows' tokens per second of decode-step time are compared
per window, over --repeats windows. Target: B's free rows at least 0.9x A's (a constrained
row does not slow the unconstrained rows of its batch by more than 10%). Writes
loadtest/results/structured.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from results_io import cpu_flags, header, write_results

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "role", "active"],
    "additionalProperties": False,
}
INSTANCES = [
    {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "tags": ["math", "poet"],
     "address": {"city": "London", "zip": "12345"}, "role": "admin", "active": True},
    {"name": "Grace Hopper", "age": 85, "email": "grace@navy.com", "tags": [],
     "address": {"city": "Arlington", "zip": "22201"}, "role": "user", "active": False},
    {"name": "Alan", "age": 41, "email": "alan@bletchley.org",
     "tags": ["enigma", "logic", "chess", "run"], "address": {"city": "Wilmslow",
                                                               "zip": "90210"},
     "role": "guest", "active": True},
]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def mask_xgrammar(tok_json: str, vocab: int, eos: list[int], walks: list[list[int]]):
    from shardserve_server.engine.grammar import Constraint, GrammarBackend

    backend = GrammarBackend(tok_json, vocab, eos)
    c = Constraint("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    backend.compile(c)
    compile_s = time.perf_counter() - t0
    times = []
    for ids in walks:
        m = backend.matcher(c)
        for t in ids:
            t0 = time.perf_counter()
            backend.fill([m], [0], 1)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t), f"xgrammar rejected token {t}"
    return compile_s, times


def mask_llguidance(tok_json: str, vocab: int, eos: list[int], walks: list[list[int]]):
    import llguidance
    import llguidance.torch as lt

    lltok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos[0])
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    bitmask = lt.allocate_token_bitmask(1, vocab)
    times = []
    for ids in walks:
        m = llguidance.LLMatcher(lltok, grammar)
        for t in ids:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(m, bitmask, 0)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), f"llguidance rejected token {t}: {m.get_error()}"
    return compile_s, times


def mask_outlines(tok_json: str, vocab: int, eos: list[int], walks: list[list[int]]):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer

    # byte-level BPE: the vocabulary's stand-in characters back to bytes (GPT-2's table)
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    byte_of = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    voc: dict[bytes, list[int]] = {}
    for s, i in Tokenizer.from_str(tok_json).get_vocab().items():
        if i in eos or any(ch not in byte_of for ch in s):
            continue
        voc.setdefault(bytes(byte_of[ch] for ch in s), []).append(i)
    vocabulary = oc.Vocabulary(eos[0], voc)
    t0 = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - t0
    bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times = []
    for ids in walks:
        g = oc.Guide(index)
        for t in ids:
            t0 = time.perf_counter()
            g.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)
            times.append(time.perf_counter() - t0)
            g.advance(t)
    return compile_s, times


LIBS = {"xgrammar": mask_xgrammar, "llguidance": mask_llguidance, "outlines-core": mask_outlines}


def part_mask(tok, args) -> list[str]:
    tok_json = tok.tokenizer.to_str()
    vocab = tok.vocab_size
    eos = list(tok.eos_token_ids)
    walks = [tok.encode(json.dumps(x, separators=(",", ":")), add_special_tokens=False)
             for x in INSTANCES]
    lines = ["## Per-step mask cost", "",
             f"Vocabulary {vocab} tokens; schema: nested object (string maxLength, pattern, "
             "bounded integer, array maxItems, enum, boolean, nested object); "
             f"{len(walks)} valid instances walked token by token "
             f"({sum(map(len, walks))} masks per run), {args.repeats} runs each.", "",
             "| library | version | compile ms | mask p50 us | mask p90 us | mask max us |",
             "|---|---|---|---|---|---|"]
    from importlib import metadata

    for name, fn in LIBS.items():
        try:
            version = metadata.version(name.replace("-", "_"))
        except metadata.PackageNotFoundError:
            lines.append(f"| {name} | not installed | | | | |")
            continue
        comp, times = [], []
        for _ in range(args.repeats):
            c, t = fn(tok_json, vocab, eos, walks)
            comp.append(c)
            times += t
        row = (f"| {name} | {version} | {statistics.median(comp) * 1e3:.1f} | "
               f"{_pct(times, 0.5) * 1e6:.1f} | {_pct(times, 0.9) * 1e6:.1f} | "
               f"{max(times) * 1e6:.0f} |")
        print(row, flush=True)
        lines.append(row)
    return lines


def part_batch(model_dir: Path, tok, args) -> list[str]:
    from shardserve_server.engine.grammar import Constraint
    from shardserve_server.engine.runner import CacheGeometry, ModelRunner
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams
    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.sharded_load import load_sharded_model
    from shardserve_sharding.tp.comm import ThreadGroup

    torch.set_num_threads(args.threads)
    model = load_sharded_model(model_dir, ThreadGroup(1).comm(0), dtype=torch.bfloat16)
    cfg = SchedulerConfig(max_batch_size=args.rows + 1, kv_cache_tokens=8192, block_size=16,
                          flat_batches=True)
    geo = CacheGeometry(cfg.kv_cache_tokens, cfg.block_size, cfg.max_batch_size)
    vocab = read_manifest(model_dir).config["vocab_size"]
    eos = tuple(tok.eos_token_ids)
    schema = Constraint("json_schema", json.dumps(SCHEMA))
    prompt = tuple(tok.encode("Write a JSON record of a famous scientist:"))

    def start(constrained: bool, rep: int) -> tuple[GroupScheduler, ModelRunner]:
        sched = GroupScheduler(cfg, family="llama", tokenizer=tok, eos_token_ids=eos,
                               max_seq_len=2048, vocab_size=vocab)
        stop = StoppingParams(max_new_tokens=args.steps + 1, ignore_eos=True)
        for i in range(args.rows):
            sched.add(GenerationRequest(prompt, SamplingParams(temperature=1.0,
                                                               seed=rep * 100 + i), stop, f"f{i}"))
        # the extra row runs as long as the free rows (it would leave early at the end of
        # its JSON value otherwise, and the batch would shrink)
        sched.add(GenerationRequest(prompt, SamplingParams(temperature=1.0, seed=7), stop, "x",
                                    constraint=schema if constrained else None))
        return sched, ModelRunner(model, geo, torch.bfloat16)

    def step(sched: GroupScheduler, runner: ModelRunner, acc: dict) -> None:
        sched.reap()
        plans = sched.schedule()
        decoding = all(not s.in_prefill for s in sched.running)
        t0 = time.perf_counter()
        for o in sched.run(plans, runner.forward):
            if decoding and o.token_id is not None and o.request_id != "x":
                acc["tokens"] += 1
        if decoding:
            acc["s"] += time.perf_counter() - t0
            acc["steps"] += 1
        sched.reap()

    def window(rep: int) -> dict[bool, dict]:
        """A and B side by side, one step each in turn (the order swapping every step), so
        that the machine's drifts hit both alike."""
        pair = {c: start(c, rep) for c in (False, True)}
        acc = {c: {"tokens": 0, "s": 0.0, "steps": 0} for c in pair}
        k = 0
        while any(sc.has_work() for sc, _ in pair.values()):
            for c in ((False, True) if k % 2 == 0 else (True, False)):
                sched, runner = pair[c]
                if sched.has_work():
                    step(sched, runner, acc[c])
            k += 1
        return acc

    window(0)  # warm-up: first shapes, the grammar compiled, weights in cache
    runs = []
    for rep in range(args.repeats):
        acc = window(rep + 1)
        a, b = (acc[c]["tokens"] / acc[c]["s"] for c in (False, True))
        runs.append((rep, a, b, acc[False]["steps"], acc[False]["s"], acc[True]["s"]))
        print(f"  repeat {rep + 1}: free rows A {a:7.1f} tok/s, B {b:7.1f} tok/s, B/A "
              f"{b / a:.3f}", flush=True)
    ratio = statistics.median(r[2] / r[1] for r in runs)
    lines = ["## A constrained row in a batch of free rows", "",
             f"Model {model_dir.name} bf16, {args.threads} thread(s), in-process "
             f"GroupScheduler (flat steps); {args.rows} free rows (temperature 1, seeded, EOS "
             "ignored) + 1 row that is free (A) or JSON-schema constrained (B); "
             f"{args.steps} new tokens per row. A and B run side by side, one decode step each "
             "in turn (order swapped every step), each with its own KV cache; the free rows' "
             "tokens per second of decode-step time (forward + sampling + masks) per batch, "
             f"{args.repeats} windows after one warm-up window.", "",
             f"Median over windows of B/A = {ratio:.3f} (target >= 0.90: "
             f"{'met' if ratio >= 0.9 else '**missed**'}).", "",
             "| window | A free-row tok/s | B free-row tok/s | B/A | decode steps | A s | B s |",
             "|---|---|---|---|---|---|---|"]
    for rep, a, b, steps, sa, sb in runs:
        lines.append(f"| {rep + 1} | {a:.1f} | {b:.1f} | {b / a:.3f} | {steps} | {sa:.2f} | "
                     f"{sb:.2f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--part", default="mask,batch", help="comma-separated: mask, batch")
    ap.add_argument("--model", default="models/smollm2-135m", help="shardserve checkpoint")
    ap.add_argument("--rows", type=int, default=8, help="free rows in the batch")
    ap.add_argument("--steps", type=int, default=48, help="new tokens per row per window")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--note", default="", help="a line for the results file")
    ap.add_argument("--out", default="structured", help="results file name")
    args = ap.parse_args()
    from shardserve_sharding.tokenizer import TokenizerBundle

    model_dir = Path(args.model)
    tok = TokenizerBundle.load(model_dir / "tokenizer")
    command = "python loadtest/bench_structured.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    lines = header("Structured output: mask cost and batch sharing", command)
    if args.note:
        lines += [f"**{args.note}**", ""]
    lines += [f"CPU flags: `{cpu_flags()}`; torch {torch.__version__}", ""]
    parts = args.part.split(",")
    if "mask" in parts:
        lines += part_mask(tok, args) + [""]
    if "batch" in parts:
        lines += part_batch(model_dir, tok, args) + [""]
    print(write_results(args.out, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
