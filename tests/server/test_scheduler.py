"""GroupScheduler driven by an in-process ModelRunner (TP=1 comm, both families): continuous
batching gives every request the tokens it gets alone, admission respects the batch and KV
budgets, chunked prefill caps prompt tokens per step without stalling decodes, cancellation
frees cache at once, and priority orders admission."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch
from serving_models import greedy_no_cache, random_model, tiny_config, tokenizer, write_model
from torch_threads import torch_threads

from shardserve_server.engine.runner import CacheGeometry, ModelRunner
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams
from shardserve_sharding.sharded_load import load_sharded_model
from shardserve_sharding.tp.comm import ThreadGroup

FAMILIES = ["llama", "llama-padded", "convlm", "rnnlm"]
"""llama: one FLAT forward per step (the torch runner's layout); llama-padded: a padded prefill
forward and a decode forward (the layout the ONNX runner takes)."""


class Setup:
    """A tiny model of one family: the full model (reference), its TP=1 shard (runner)."""

    def __init__(self, variant: str, tmp) -> None:
        family = variant.split("-")[0]
        self.family, self.flat = family, variant == "llama"
        self.tok = tokenizer()
        self.vocab = self.tok.vocab_size
        self.model = random_model(family, tiny_config(family, self.vocab, max_seq_len=96), 7)
        path = write_model(tmp / family, self.model, self.tok)
        self.shard = load_sharded_model(path, ThreadGroup(1).comm(0))

    def make(self, **kw) -> tuple[GroupScheduler, ModelRunner]:
        cfg = SchedulerConfig(**{"block_size": 4, "kv_cache_tokens": 1024,
                                 "flat_batches": self.flat, **kw})
        sched = GroupScheduler(cfg, family=self.family, tokenizer=self.tok,
                               eos_token_ids=tuple(self.tok.eos_token_ids), max_seq_len=96)
        geo = CacheGeometry(cfg.kv_cache_tokens, cfg.block_size, cfg.max_batch_size)
        return sched, ModelRunner(self.shard, geo, torch.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy machine."""
    with torch_threads(1):
        yield


_SETUPS: dict[str, Setup] = {}


def _setup(family: str, tmp_path_factory) -> Setup:
    if family not in _SETUPS:
        _SETUPS[family] = Setup(family, tmp_path_factory.mktemp("sched"))
    return _SETUPS[family]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    return _setup("llama", tmp_path_factory)


def greedy(prompt, n: int, rid: str) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0),
                             StoppingParams(max_new_tokens=n, ignore_eos=True), rid)


class Trace:
    """What a drive produced: tokens and results per request, plans and running sets per step."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.results: dict = {}
        self.steps: list[list[tuple]] = []  # per step: (plan, [ids], samples)
        self.finish: dict[str, str] = {}

    def record(self, outputs) -> None:
        for out in outputs:
            if out.token_id is not None:
                self.tokens[out.request_id].append(out.token_id)
            if out.result is not None:
                self.results[out.request_id] = out.result
                self.finish[out.request_id] = out.result.finish_reason.value


def drive(sched, runner, arrivals=None, on_schedule=None, before_step=None,
          max_steps=2000) -> Trace:
    """The leader's step in-process (reap, schedule, then the scheduler's own forward ->
    process loop); `arrivals` maps a step number to requests (req, priority) added before it;
    hooks see the scheduler each step."""
    arrivals = dict(arrivals or {})
    tr = Trace()
    step = 0
    while sched.has_work() or arrivals:
        assert step < max_steps, "scheduler made no progress"
        for req, prio in arrivals.pop(step, []):
            sched.add(req, prio)
        if before_step:
            before_step(step, sched)
        tr.record(sched.reap())
        plans = sched.schedule()
        tr.steps.append([(p, [s.id for s in rows], list(sm)) for p, rows, sm in plans])
        if on_schedule:
            on_schedule(step, sched, plans)
        tr.record(sched.run(plans, runner.forward))
        step += 1
    tr.record(sched.reap())
    return tr


def alone(setup: Setup, req: GenerationRequest, **kw) -> list[int]:
    sched, runner = setup.make(**kw)
    tr = drive(sched, runner, {0: [(req, 0)]})
    return tr.tokens[req.request_id]


def check_invariants(sched: GroupScheduler) -> None:
    """After schedule(): batch and KV bounds, and each table holds its cached tokens with less
    than one block of waste."""
    cfg = sched.cfg
    assert len(sched.running) <= cfg.max_batch_size
    assert sched.reserved <= sched.budget
    if sched.paged:
        assert sched.alloc.used_blocks * cfg.block_size <= sched.reserved
        owned = {b for s in sched.running for b in s.table}
        assert len(owned) == sched.alloc.used_blocks  # shared blocks counted once
        for b in owned:
            assert sched.alloc.refcount(b) == sum(s.table.count(b) for s in sched.running)
        for s in sched.running:
            assert len(s.table) <= s.need_blocks
            cached = s.prefilled + len(s.seq.output_ids)
            assert 0 <= len(s.table) * cfg.block_size - cached < cfg.block_size
    else:
        assert sched.alloc.used_blocks == sum(len(s.table) for s in sched.running)


def test_staggered_requests_get_their_alone_tokens(setup):
    """20 requests of different lengths arriving over several steps, batched continuously,
    each produce the same greedy tokens as when run alone (and as a cache-free reference)."""
    rng = random.Random(11)
    reqs = [greedy([rng.randrange(setup.vocab) for _ in range(rng.randint(1, 40))],
                   rng.randint(1, 12), f"r{i}") for i in range(20)]
    arrivals = {0: [(r, 0) for r in reqs[:6]]}
    for k, i in enumerate(range(6, 20, 2)):
        arrivals[1 + 2 * k] = [(reqs[i], 0), (reqs[i + 1], 0)]
    kw = {"max_batch_size": 6, "kv_cache_tokens": 192, "max_prefill_tokens": 24}
    sched, runner = setup.make(**kw)
    peak = {"running": 0, "rows": 0}

    def on_schedule(step, s, plans):
        check_invariants(s)
        peak["running"] = max(peak["running"], len(s.running))
        peak["rows"] = max(peak["rows"], sum(len(r) for _, r, _ in plans))

    tr = drive(sched, runner, arrivals, on_schedule)
    assert peak["running"] >= 4 and peak["rows"] >= 4  # it really batched
    for r in reqs:
        rid, n = r.request_id, r.stopping.max_new_tokens
        assert tr.results[rid].token_ids == tr.tokens[rid] and tr.finish[rid] == "max_tokens"
        assert len(tr.tokens[rid]) == n
        assert tr.tokens[rid] == alone(setup, r, **kw), rid
        assert tr.tokens[rid] == greedy_no_cache(setup.model, list(r.prompt_ids), n), rid
    assert sched.alloc.used_blocks == 0 and sched.reserved == 0 and not sched.by_id


def test_max_batch_size_bounds_admission(setup):
    reqs = [greedy([5 + i, 7, 9], 6, f"b{i}") for i in range(7)]
    sched, runner = setup.make(max_batch_size=3)
    seen = []

    def on_schedule(step, s, plans):
        check_invariants(s)
        seen.append((len(s.running), len(s.pending)))

    tr = drive(sched, runner, {0: [(r, 0) for r in reqs]}, on_schedule)
    assert max(r for r, _ in seen) == 3
    assert seen[0] == (3, 4)  # the rest waited
    assert all(len(tr.tokens[r.request_id]) == 6 for r in reqs)


def test_kv_budget_bounds_admission(llama_setup):
    """Each request reserves prompt + max_new_tokens (rounded to blocks); with room for two,
    never more than two run, reserved tokens never exceed the budget, all finish correctly.
    (Llama only: the conv LM has a fixed-size state per sequence, bounded by the batch.)"""
    setup = llama_setup
    rng = random.Random(2)
    reqs = [greedy([rng.randrange(setup.vocab) for _ in range(20)], 10, f"k{i}")
            for i in range(5)]  # 30 tokens -> 32 reserved of 64
    kw = {"max_batch_size": 8, "kv_cache_tokens": 64}
    sched, runner = setup.make(**kw)
    running = []

    def on_schedule(step, s, plans):
        check_invariants(s)
        running.append(len(s.running))

    tr = drive(sched, runner, {0: [(r, 0) for r in reqs]}, on_schedule)
    assert max(running) == 2
    for r in reqs:
        assert tr.tokens[r.request_id] == alone(setup, r, **kw)
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(greedy([1] * 60, 10, "too-big"))
    with pytest.raises(ValueError, match="max_seq_len"):
        setup.make(kv_cache_tokens=4096)[0].add(greedy([1] * 90, 10, "too-long"))


def test_chunked_prefill_caps_prompt_tokens_and_decodes_keep_stepping(setup):
    """A long prompt arriving while two sequences decode is read max_prefill_tokens at a time
    (in a flat step, less the two decode rows it carries) over several steps; every one of
    those steps also advances both decoding sequences."""
    rng = random.Random(3)
    short = [greedy([rng.randrange(setup.vocab) for _ in range(3)], 30, f"s{i}")
             for i in range(2)]
    long = greedy([rng.randrange(setup.vocab) for _ in range(60)], 4, "long")
    kw = {"max_batch_size": 4, "max_prefill_tokens": 8}
    sched, runner = setup.make(**kw)
    per_step = 8 - 2 if sched.cfg.flat_batches and sched.paged else 8
    chunks = []

    def on_schedule(step, s, plans):
        check_invariants(s)
        per_row = {}  # request id -> tokens it runs this step (any plan layout)
        for plan, rows, _ in plans:
            for i, x in enumerate(rows):
                per_row[x.id] = int(plan.num_new[i])
        # prompt tokens this step (the long prompt's chunk, any row of several tokens)
        assert sum(n for rid, n in per_row.items() if rid == "long" or n > 1) <= per_step, step
        if per_row.get("long", 0) > 1:  # the long prompt is being read
            chunks.append((step, per_row["long"]))
            assert per_row.get("s0") == 1 and per_row.get("s1") == 1, step  # decodes step too

    tr = drive(sched, runner, {0: [(r, 0) for r in short], 3: [(long, 0)]}, on_schedule)
    full, rest = divmod(60, per_step)
    assert [n for _, n in chunks] == [per_step] * full + [rest] * bool(rest)
    assert [st for st, _ in chunks] == list(range(chunks[0][0], chunks[0][0] + len(chunks)))
    for r in [*short, long]:
        assert tr.tokens[r.request_id] == alone(setup, r, **kw), r.request_id


def test_cancel_frees_cache_at_once_and_usage_returns_to_zero(setup):
    """Cancel one decoding sequence, one mid-prefill and one still pending: each ends CANCELLED
    at the next reap with its blocks (or state slot) free; the others finish unchanged."""
    rng = random.Random(4)
    mk = lambda n, new, rid: greedy([rng.randrange(setup.vocab) for _ in range(n)], new, rid)  # noqa: E731
    reqs = [mk(5, 40, "dec"), mk(6, 8, "keep"), mk(50, 8, "pre"), mk(4, 8, "pend"),
            mk(7, 6, "keep2")]
    kw = {"max_batch_size": 3, "max_prefill_tokens": 8, "kv_cache_tokens": 256}
    sched, runner = setup.make(**kw)
    state = {}

    def before_step(step, s):
        if step == 4:
            st = {x.id: x for x in s.running}
            assert not st["dec"].in_prefill and st["dec"].seq.output_ids
            assert st["pre"].in_prefill and st["pre"].prefilled > 0
            assert "pend" in [x.id for x in s.pending]
            state["used"] = s.alloc.used_blocks
            state["freed"] = len(st["dec"].table) + len(st["pre"].table)
            for rid in ("dec", "pre", "pend"):
                assert s.cancel(rid)
            ev = state["events"] = s.reap()
            assert {e.request_id for e in ev} == {"dec", "pre", "pend"}
            assert all(e.result.finish_reason.value == "cancelled" for e in ev)
            assert s.alloc.used_blocks == state["used"] - state["freed"]
            assert {x.id for x in s.running} == {"keep"}
            assert not s.cancel("dec")  # gone

    def on_schedule(step, s, plans):
        check_invariants(s)

    tr = drive(sched, runner, {0: [(r, 0) for r in reqs]}, on_schedule, before_step)
    assert state["freed"] > 0
    results = {e.request_id: e.result for e in state["events"]}
    assert results["pend"].token_ids == [] and results["pre"].token_ids == []
    assert results["dec"].token_ids == tr.tokens["dec"] and 0 < len(tr.tokens["dec"]) < 40
    for rid in ("keep", "keep2"):
        r = next(x for x in reqs if x.request_id == rid)
        assert tr.tokens[rid] == alone(setup, r, **kw)
    st = sched.stats()
    assert st.kv_used_blocks == 0 and st.reserved_tokens == 0
    assert st.running == 0 and st.pending == 0 and not sched.by_id


def test_higher_priority_pending_request_is_admitted_first(setup):
    sched, runner = setup.make(max_batch_size=1)
    order = []

    def on_schedule(step, s, plans):
        for x in s.running:
            if x.id not in order:
                order.append(x.id)

    arrivals = {0: [(greedy([1, 2, 3], 3, "first"), 0)],
                1: [(greedy([4, 5], 2, "low"), 0), (greedy([6, 7], 2, "high"), 5),
                    (greedy([8], 2, "low2"), 0), (greedy([9], 2, "mid"), 2)]}
    tr = drive(sched, runner, arrivals, on_schedule)
    assert order == ["first", "high", "mid", "low", "low2"]
    assert all(len(v) in (2, 3) for v in tr.tokens.values())


def test_ragged_prefill_near_max_seq_len(setup):
    """A prompt's short last chunk at positions near max_seq_len shares a forward with a long
    chunk of another prompt: the padding must not index past the rotary table (regression)."""
    if getattr(setup, "flat", False):
        pytest.skip("a FLAT plan has no padding columns")
    rng = random.Random(6)
    a = greedy([rng.randrange(setup.vocab) for _ in range(85)], 8, "near-max")  # 93 of 96
    b = greedy([rng.randrange(setup.vocab) for _ in range(35)], 8, "other")
    kw = {"max_batch_size": 4, "max_prefill_tokens": 40}
    sched, runner = setup.make(**kw)
    shared = []

    def on_schedule(step, s, plans):
        for plan, rows, _ in plans:
            if {x.id for x in rows} == {"near-max", "other"} and plan.tokens.shape[1] == 35:
                shared.append(int(plan.positions.max()))

    tr = drive(sched, runner, {0: [(a, 0), (b, 0)]}, on_schedule)
    assert shared and shared[0] < 96
    for r in (a, b):
        assert tr.tokens[r.request_id] == alone(setup, r, **kw)
        assert tr.tokens[r.request_id] == greedy_no_cache(setup.model, list(r.prompt_ids), 8)


def test_a_sampling_failure_still_ends_every_row_of_the_forward(llama_setup, monkeypatch):
    """When sampling raises midway, each row of that forward gets exactly one final output:
    a row already ended by non-finite logits keeps its own, a running row fails, and no
    stream is left waiting for a result that never comes."""
    sched, runner = llama_setup.make()
    sched.add(greedy([5, 6, 7], 8, "nan"))
    sched.add(greedy([8, 9, 10], 8, "ok"))
    for _ in range(3):  # prefills and a decode or two: both rows decoding
        sched.step(runner.forward)
    plans = sched.schedule()
    (plan, rows, samples), = plans
    logits = runner.forward(plan).clone()  # [2, V]
    logits[[s.id for s in rows].index("nan")] = float("nan")

    def boom(*a, **kw):
        raise RuntimeError("sampler bug")

    monkeypatch.setattr(sched.sampler, "sample", boom)
    monkeypatch.setattr(sched.sampler, "sample_with_full_logprobs", boom)
    outs = sched.process_safely(logits, rows, samples)
    finals = {o.request_id: o.result for o in outs if o.result is not None}
    assert sorted(finals) == ["nan", "ok"] and len(outs) == 2
    assert "non-finite" in finals["nan"].error and "sampler bug" in finals["ok"].error
    sched.reap()
    assert not sched.running and sched.alloc.used_blocks == 0
