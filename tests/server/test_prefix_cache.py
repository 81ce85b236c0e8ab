"""Prefix caching: the block pool's reference counts, lookup and eviction, and the scheduler
sharing cached KV blocks between requests with equal prompt prefixes, with outputs (tokens
and log-probabilities) equal to those computed without the cache."""

from __future__ import annotations

import random

import pytest
from test_scheduler import Setup, check_invariants, drive

from shardserve_server.engine import block_pool
from shardserve_server.engine.block_pool import ROOT_KEY, BlockAllocator, prefix_keys
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams

BS = 4


def pool(n: int = 8) -> BlockAllocator:
    return BlockAllocator(n, BS, prefix_caching=True)


def cache_seq(a: BlockAllocator, ids: list[int]) -> list[int]:
    """Allocate blocks for `ids`, register their full blocks, drop the reference."""
    table = a.allocate(a.blocks_for(len(ids)))
    done, _ = a.register(table, ids, 0, ROOT_KEY)
    assert done == len(ids) // BS
    a.free(table)
    return table


# ---- the block pool
def test_lookup_finds_the_longest_cached_prefix_and_stops_at_the_first_difference():
    a = pool()
    ids = list(range(10, 22))  # three full blocks
    table = cache_seq(a, ids)
    assert a.cached_blocks == 3 and a.used_blocks == 0 and a.free_blocks == 8
    assert a.lookup(ids, 3) == (table, prefix_keys(ids, BS, 3)[-1])
    assert a.lookup(ids, 2)[0] == table[:2]  # capped
    assert a.lookup(ids[:4] + [99] + ids[5:], 3)[0] == table[:1]  # differs in block 2
    assert a.lookup([99] + ids[1:], 3) == ([], ROOT_KEY)  # differs in block 1
    assert a.lookup(ids[:7], 3)[0] == table[:1]  # a partial block never hits
    off = BlockAllocator(8, BS)
    off.register(off.allocate(3), ids, 0, ROOT_KEY)
    assert off.lookup(ids, 3) == ([], ROOT_KEY) and off.cached_blocks == 0


def test_equal_blocks_under_different_prefixes_are_different_entries():
    """A block's key chains its parent: the same 4 tokens after another prefix do not hit."""
    a = pool()
    cache_seq(a, [1, 2, 3, 4, 5, 6, 7, 8])
    assert a.lookup([9, 9, 9, 9, 5, 6, 7, 8], 2) == ([], ROOT_KEY)


def test_references_are_counted_and_unreferenced_cached_blocks_stay_until_needed():
    a = pool(4)
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    table = cache_seq(a, ids)
    hits, _ = a.lookup(ids, 2)
    assert a.revived(hits) == 2
    a.acquire(hits)
    a.acquire(hits[:1])  # a second sequence shares the first block
    assert [a.refcount(b) for b in table] == [2, 1] and a.used_blocks == 2
    assert a.revived(hits) == 0
    a.free(hits)
    a.free(hits[:1])
    assert [a.refcount(b) for b in table] == [0, 0] and a.cached_blocks == 2
    with pytest.raises(RuntimeError, match="freed more often"):
        a.free(hits[:1])


def test_allocation_takes_plain_free_blocks_first_then_evicts_least_recently_freed():
    a = pool(4)
    first = cache_seq(a, [1, 2, 3, 4])
    second = cache_seq(a, [5, 6, 7, 8])
    assert a.free_blocks == 4 and a.cached_blocks == 2
    plain = a.allocate(2)  # the two never-cached blocks
    assert set(plain).isdisjoint(first + second) and a.cached_blocks == 2
    assert a.allocate(1) == first  # least recently freed goes first
    assert a.lookup([1, 2, 3, 4], 1)[0] == [] and a.lookup([5, 6, 7, 8], 1)[0] == second
    assert a.allocate(1) == second and a.cached_blocks == 0
    with pytest.raises(MemoryError, match="exhausted"):
        a.allocate(1)


def test_a_sequence_frees_its_tail_first():
    """Freed tail first, the prefix blocks others are likelier to share are evicted last."""
    a = pool(3)
    table = cache_seq(a, list(range(12)))
    assert a.allocate(1) == [table[2]] and a.allocate(1) == [table[1]]
    assert a.lookup(list(range(12)), 3)[0] == table[:1]


def test_hash_collision_never_serves_another_prefix(monkeypatch):
    """Every key equal: a lookup is confirmed against the cached tokens and parent."""
    monkeypatch.setattr(block_pool, "block_key", lambda parent, tokens, salt=0: 7)
    a = pool()
    table = cache_seq(a, [1, 2, 3, 4])
    assert a.lookup([5, 6, 7, 8], 1) == ([], ROOT_KEY)
    assert a.lookup([1, 2, 3, 4], 1)[0] == table
    other = a.allocate(1)  # same key, other tokens: stays private
    a.register(other, [5, 6, 7, 8], 0, ROOT_KEY)
    assert a.cached_blocks == 1 and a.lookup([1, 2, 3, 4], 1)[0] == table


def test_register_skips_blocks_whose_prefix_is_cached_already():
    """Two sequences computing the same prefix at once: the first one's blocks are cached,
    the second's stay private and go back to the plain free list when freed."""
    a = pool()
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    t1, t2 = a.allocate(2), a.allocate(2)
    assert a.register(t1, ids, 0, ROOT_KEY)[0] == 2
    assert a.register(t2, ids, 0, ROOT_KEY) == (2, prefix_keys(ids, BS, 2)[-1])
    assert a.cached_blocks == 2 and a.lookup(ids, 2)[0] == t1
    a.free(t2)
    assert a.cached_blocks == 2 and not set(t2) & set(a._evictable)  # plain blocks again


def test_reset_drops_unreferenced_cached_blocks_only():
    a = pool()
    t1 = cache_seq(a, [1, 2, 3, 4])
    cache_seq(a, [5, 6, 7, 8])
    a.acquire(t1)
    assert a.reset_prefix_cache() == 1
    assert a.cached_blocks == 1 and a.lookup([1, 2, 3, 4], 1)[0] == t1
    assert a.lookup([5, 6, 7, 8], 1)[0] == []


# ---- the scheduler on a real tiny model
def req(prompt, n, rid, logprobs=None) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0),
                             StoppingParams(max_new_tokens=n, ignore_eos=True), rid,
                             logprobs=logprobs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return Setup("llama", tmp_path_factory.mktemp("prefix"))


def test_a_later_request_reuses_the_cached_prefix_with_equal_outputs(llama):
    """B shares A's first 17 tokens: B takes 4 blocks (16 tokens) from the cache, prefills only
    the rest (tokens fed to the model: 3 + 5 decodes, not 19 + 5), and its tokens and
    log-probabilities equal those computed without the cache."""
    rng = random.Random(21)
    shared = [rng.randrange(llama.vocab) for _ in range(17)]
    a = req(shared + [3, 4, 5], 6, "a", logprobs=0)
    b = req(shared + [9, 8], 6, "b", logprobs=0)
    out = {}
    for caching in (True, False):
        sched, runner = llama.make(prefix_caching=caching)
        prefills = []

        def on_schedule(step, s, plans, prefills=prefills):
            check_invariants(s)
            for plan, rows, _ in plans:
                for i, x in enumerate(rows):
                    if x.id == "b":
                        prefills.append(int(plan.num_new[i]))

        tr = drive(sched, runner, {0: [(a, 0)], 12: [(b, 0)]}, on_schedule)
        out[caching] = tr, sched, prefills
    (on, s_on, pre_on), (off, s_off, pre_off) = out[True], out[False]
    assert on.results["b"].cached_tokens == 16 and off.results["b"].cached_tokens == 0
    assert on.results["a"].cached_tokens == 0
    assert sum(pre_on) == 19 - 16 + 5 and sum(pre_off) == 19 + 5  # prompt + 5 decodes
    for rid in ("a", "b"):
        assert on.tokens[rid] == off.tokens[rid]
        lp_on, lp_off = on.results[rid].logprobs, off.results[rid].logprobs
        diff = max(abs(x - y) for x, y in zip(lp_on, lp_off, strict=True))
        assert diff <= 1e-4 * max(map(abs, lp_off))
    st = s_on.stats()
    assert st.prefix_cache_queries == 20 + 19 and st.prefix_cache_hits == 16
    assert s_off.stats().prefix_cache_hits == 0
    assert st.kv_used_blocks == 0 and s_on.alloc.cached_blocks > 0


def test_an_identical_prompt_still_computes_its_last_token(llama):
    """A prompt of whole blocks, all cached: the last block is recomputed (its last position's
    logits give the first token), so the hit is one block short."""
    prompt = list(range(3, 19))  # 16 tokens, 4 blocks
    sched, runner = llama.make()
    tr = drive(sched, runner, {0: [(req(prompt, 3, "x"), 0)], 8: [(req(prompt, 3, "y"), 0)]},
               lambda step, s, plans: check_invariants(s))
    assert tr.results["y"].cached_tokens == 12 and tr.tokens["y"] == tr.tokens["x"]


def test_randomized_shared_prefix_workload_matches_the_uncached_run(llama):
    """40 requests over three system prompts and unshared ones, arriving over time, a KV pool
    small enough to evict, running requests sharing blocks, cancellations: every request not
    cancelled gets the tokens it gets without the cache, bounds hold every step, and at the end
    no block is referenced."""
    rng = random.Random(5)
    systems = [[rng.randrange(llama.vocab) for _ in range(rng.randint(9, 30))]
               for _ in range(3)]
    reqs, arrivals = [], {}
    for i in range(40):
        head = rng.choice(systems + [[]])
        prompt = head + [rng.randrange(llama.vocab) for _ in range(rng.randint(1, 12))]
        r = req(prompt, rng.randint(1, 10), f"q{i}")
        reqs.append(r)
        arrivals.setdefault(rng.randrange(60), []).append((r, 0))
    cancels = {rng.randrange(5, 60): f"q{rng.randrange(40)}" for _ in range(6)}
    kw = {"max_batch_size": 6, "kv_cache_tokens": 160, "max_prefill_tokens": 24}

    def run(caching: bool):
        sched, runner = llama.make(prefix_caching=caching, **kw)
        ended = set()

        def before_step(step, s):
            rid = cancels.get(step)
            if rid and s.cancel(rid):
                ended.add(rid)

        def on_schedule(step, s, plans):
            check_invariants(s)
            shared = sum(1 for b in range(s.alloc.num_blocks) if s.alloc.refcount(b) > 1)
            peak["shared"] = max(peak["shared"], shared)

        peak = {"shared": 0}
        tr = drive(sched, runner, arrivals, on_schedule, before_step)
        assert sched.alloc.used_blocks == 0 and sched.reserved == 0 and not sched.by_id
        assert all(sched.alloc.refcount(b) == 0 for b in range(sched.alloc.num_blocks))
        return tr, sched, ended, peak["shared"]

    on, s_on, ended_on, shared_on = run(True)
    off, s_off, ended_off, _ = run(False)
    st = s_on.stats()
    assert st.prefix_cache_hits > 0.2 * st.prefix_cache_queries
    assert shared_on > 0  # running sequences really shared blocks
    assert sum(r.cached_tokens for r in on.results.values()) == st.prefix_cache_hits
    for r in reqs:
        rid = r.request_id
        if rid in ended_on or rid in ended_off:
            continue
        assert on.finish[rid] == off.finish[rid] == "max_tokens", rid
        assert on.tokens[rid] == off.tokens[rid], rid


def test_a_prefix_still_being_prefilled_is_waited_for_then_shared(llama):
    """A reads a 60-token prompt 8 tokens a step; B, with the same prompt plus 2 tokens,
    arrives mid-way: it waits (instead of recomputing what A is computing) and then takes
    every full block A prefilled itself, and both get the tokens they get without the
    cache."""
    rng = random.Random(8)
    shared = [rng.randrange(llama.vocab) for _ in range(60)]
    a, b = req(shared, 4, "a"), req(shared + [1, 2], 4, "b")
    kw = {"max_prefill_tokens": 8}
    got = {}
    for caching in (True, False):
        sched, runner = llama.make(prefix_caching=caching, **kw)
        seen = {}

        def before_step(step, s, seen=seen):
            if step == 3:
                x = next(x for x in s.running if x.id == "a")
                seen["a_prefilled"] = x.prefilled  # computed by the forwards so far

        tr = drive(sched, runner, {0: [(a, 0)], 3: [(b, 0)]},
                   lambda step, s, plans: check_invariants(s), before_step)
        got[caching] = tr, seen
    (on, seen), (off, _) = got[True], got[False]
    assert 0 < seen["a_prefilled"] < 60
    # A caches the full blocks of its prompt but the one holding its last token
    assert on.results["b"].cached_tokens == (60 - 1) // BS * BS > seen["a_prefilled"]
    assert on.tokens == off.tokens
