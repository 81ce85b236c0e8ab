"""Paged decoding state: BlockAllocator accounting, PagedKVCache (padded and FLAT steps) and
StateSlotPool logits equal a full forward for ragged steps (prefill chunks, decode rows, chunked
prefill, reused blocks)."""

from __future__ import annotations

import random

import pytest
import torch
from serving_models import random_model, rel_err, tiny_config
from torch_threads import torch_threads

from shardserve_server.engine.block_pool import BlockAllocator
from shardserve_server.engine.paged_cache import PagedKVCache, StateSlotPool, _adjacent_kv
from shardserve_server.engine.runner import FLAT, CacheGeometry, ForwardPlan, ModelRunner
from shardserve_sharding.models import fused_ops, model_spec

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def llama():
    return random_model("llama", tiny_config("llama", vocab_size=97, max_seq_len=96), seed=3)


@pytest.fixture(scope="module")
def convlm():
    return random_model("convlm", tiny_config("convlm", vocab_size=97, max_seq_len=96), seed=4)


@pytest.fixture(scope="module")
def rnnlm():
    return random_model("rnnlm", tiny_config("rnnlm", vocab_size=97, max_seq_len=96), seed=6)


def _prompts(rng: random.Random, n: int, vocab: int, lo: int = 1, hi: int = 40) -> list[list]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _random_steps(rng: random.Random, lengths: list[int]):
    """Yield steps [(seq, start, n)]: each picks some unfinished sequences (at least one) and
    gives each a chunk: one token (a decode-like row) or a ragged prefill chunk."""
    done = [0] * len(lengths)
    while True:
        active = [i for i, n in enumerate(lengths) if done[i] < n]
        if not active:
            return
        rows = rng.sample(active, rng.randint(1, len(active)))
        step = []
        for i in rows:
            left = lengths[i] - done[i]
            n = 1 if rng.random() < 0.4 else rng.randint(1, left)
            step.append((i, done[i], n))
            done[i] += n
        yield step


def _batch(seqs, step, *, pad_positions: str):
    b, t = len(step), max(n for _, _, n in step)
    tokens = torch.zeros(b, t, dtype=torch.long)
    positions = torch.empty(b, t, dtype=torch.long)
    num_new = torch.empty(b, dtype=torch.long)
    for r, (i, start, n) in enumerate(step):
        tokens[r, :n] = torch.tensor(seqs[i][start : start + n])
        pos = torch.arange(start, start + t)
        positions[r] = pos if pad_positions == "arange" else pos.clamp(max=start + n - 1)
        num_new[r] = n
    return tokens, positions, num_new


def _full_logits(model, seqs) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(torch.tensor([s]), torch.arange(len(s))[None])[0] for s in seqs]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_kv_cache_equals_full_forward(llama, block_size, seed):
    """Ragged steps mixing one-token rows and prefill chunks (a prompt spread over several
    steps), block tables that interleave, and a second wave reusing the first wave's (dirty)
    blocks: every logit equals the full forward's."""
    rng = random.Random(seed)
    attn = llama.layers[0].attention
    num_blocks = 160 // block_size + 8
    cache = PagedKVCache(n_layers=len(llama.layers), num_blocks=num_blocks,
                         block_size=block_size, n_kv_heads=attn.n_kv_heads,
                         head_dim=attn.head_dim, dtype=torch.float32)
    cache.k.normal_(0, 100.0)  # garbage everywhere: only masking keeps it out
    cache.v.normal_(0, 100.0)
    alloc = BlockAllocator(num_blocks, block_size)
    for wave in range(2):
        seqs = _prompts(rng, 5, 97)
        ref = _full_logits(llama, seqs)
        got = [torch.full_like(r, float("nan")) for r in ref]
        tables: list[list[int]] = [[] for _ in seqs]
        multi_chunk = set()
        for step in _random_steps(rng, [len(s) for s in seqs]):
            for i, start, n in step:
                alloc.grow(tables[i], start + n)
                if start > 0 and n > 1:
                    multi_chunk.add(i)
            pad = "arange" if (wave + len(step)) % 2 else "clamp"
            tokens, positions, num_new = _batch(seqs, step, pad_positions=pad)
            nb = max(len(tables[i]) for i, _, _ in step)
            bt = torch.full((len(step), nb), -1, dtype=torch.long)
            for r, (i, _, _) in enumerate(step):
                bt[r, : len(tables[i])] = torch.tensor(tables[i])
            cache.set_step(bt, positions, num_new)
            with torch.inference_mode():
                out = llama(tokens, positions, cache)  # [B, T, V]
            for r, (i, start, n) in enumerate(step):
                got[i][start : start + n] = out[r, :n]
        for i, s in enumerate(seqs):
            assert len(tables[i]) == alloc.blocks_for(len(s))
            assert rel_err(got[i], ref[i]) <= TOL, (wave, i)
        assert multi_chunk, "the schedule should continue some prompt with a chunk"
        for t in tables:
            alloc.free(t)
        assert alloc.used_blocks == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decode_kernel", [True, False], ids=["kernel", "gather"])
def test_flat_steps_equal_full_forward(llama, block_size, seed, decode_kernel):
    """FLAT steps (all of a step's tokens in one row): prompt chunks from position 0 and from
    mid-sequence, one-token rows before, between and after them (the trailing ones take the
    batched decode path: the C++ kernel reading the pool in place, or whole-block gathers +
    SDPA), garbage in every free slot, a second wave on dirty blocks: every logit equals the
    full forward's."""
    rng = random.Random(100 + seed)
    attn = llama.layers[0].attention
    num_blocks = 160 // block_size + 8
    cache = PagedKVCache(n_layers=len(llama.layers), num_blocks=num_blocks,
                         block_size=block_size, n_kv_heads=attn.n_kv_heads,
                         head_dim=attn.head_dim, dtype=torch.float32)
    if decode_kernel and cache._step_kernel is None:
        pytest.skip("the decode attention kernel could not be built here (no C++ toolchain)")
    if not decode_kernel:
        cache._step_kernel = cache._qkv_kernel = None  # the torch path
    cache.k.normal_(0, 100.0)
    cache.v.normal_(0, 100.0)
    alloc = BlockAllocator(num_blocks, block_size)
    decode_batches = 0
    for _wave in range(2):
        seqs = _prompts(rng, 5, 97)
        ref = _full_logits(llama, seqs)
        got = [torch.full_like(r, float("nan")) for r in ref]
        tables: list[list[int]] = [[] for _ in seqs]
        for step in _random_steps(rng, [len(s) for s in seqs]):
            rng.shuffle(step)
            step.sort(key=lambda r: r[2] == 1)  # mostly chunks first, as the scheduler does
            if rng.random() < 0.3:
                rng.shuffle(step)  # any order must work
            decode_batches += sum(1 for r in step if r[2] == 1) > 1
            toks, pos, lens = [], [], []
            for i, start, n in step:
                alloc.grow(tables[i], start + n)
                toks += seqs[i][start : start + n]
                pos += range(start, start + n)
                lens.append(n)
            nb = max(len(tables[i]) for i, _, _ in step)
            bt = torch.full((len(step), nb), -1, dtype=torch.long)
            for r, (i, _, _) in enumerate(step):
                bt[r, : len(tables[i])] = torch.tensor(tables[i])
            cache.set_flat_step(bt, torch.tensor(pos), torch.tensor(lens))
            with torch.inference_mode():
                out = llama(torch.tensor([toks]), torch.tensor([pos]), cache)[0]  # [N, V]
            o = 0
            for i, start, n in step:
                got[i][start : start + n] = out[o : o + n]
                o += n
        for i in range(len(seqs)):
            assert rel_err(got[i], ref[i]) <= TOL, i
        for t in tables:
            alloc.free(t)
    assert decode_batches, "some step should batch several one-token rows"


def test_bf16_flat_steps_with_fused_ops_are_bit_identical(llama, monkeypatch):
    """bf16 FLAT steps (prompt chunks, then batched decode rows through the C++ attention)
    give the same bits with the fused RMSNorm/rotary/SiLU kernels (models/fused_ops.py) as
    with plain torch ops, and greedy continuations pick the same tokens."""
    if fused_ops.kernels() is None:
        pytest.skip("the fused kernels could not be built here (no C++ toolchain)")
    model = random_model("llama", tiny_config("llama", vocab_size=97, max_seq_len=96), seed=3)
    model = model.to(torch.bfloat16)
    model.reset_buffers()  # fp32 rotary tables, as the loader leaves them
    attn = model.layers[0].attention
    rng = random.Random(7)
    seqs = _prompts(rng, 4, 97, lo=3, hi=20)
    steps = list(_random_steps(rng, [len(s) for s in seqs]))

    def run() -> list[torch.Tensor]:
        cache = PagedKVCache(n_layers=len(model.layers), num_blocks=40, block_size=4,
                             n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim,
                             dtype=torch.bfloat16)
        alloc, tables = BlockAllocator(40, 4), [[] for _ in seqs]
        outs, gen = [], [list(s) for s in seqs]
        for step in [*steps, *[[(i, len(s) + t, 1) for i, s in enumerate(seqs)]
                               for t in range(4)]]:  # then 4 greedy decode steps of every row
            step = sorted(step, key=lambda r: r[2] == 1)  # chunks first, decode rows last
            toks, pos, lens = [], [], []
            for i, start, n in step:
                alloc.grow(tables[i], start + n)
                toks += gen[i][start : start + n]
                pos += range(start, start + n)
                lens.append(n)
            bt = torch.full((len(step), max(len(tables[i]) for i, _, _ in step)), -1)
            for r, (i, _, _) in enumerate(step):
                bt[r, : len(tables[i])] = torch.tensor(tables[i])
            cache.set_flat_step(bt, torch.tensor(pos), torch.tensor(lens))
            with torch.inference_mode():
                out = model(torch.tensor([toks]), torch.tensor([pos]), cache)[0]  # [N, V]
            outs.append(out)
            last = torch.tensor(lens).cumsum(0) - 1
            for r, (i, start, n) in enumerate(step):
                if start + n == len(gen[i]):
                    gen[i].append(int(out[last[r]].argmax()))  # greedy next token
        return outs

    fused = run()
    monkeypatch.setitem(fused_ops._STATE, "mod", None)  # the plain torch path
    plain = run()
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))
               for a, b in zip(fused, plain, strict=True))


def test_adjacent_kv_views_only_adjacent_heads():
    """K and V heads side by side in one fused QKV row (the fused rotary leaves them so) are
    written with one copy as a [N, 2, Hkv, D] view; anything else is left to two copies."""
    qkv = torch.randn(1, 5, 4 + 2 * 2, 8)  # [1, N, H + 2 Hkv, D]
    k, v = qkv[:, :, 4:6].transpose(1, 2), qkv[:, :, 6:].transpose(1, 2)  # [1, Hkv, N, D]
    kv = _adjacent_kv(k, v)
    assert kv is not None and torch.equal(kv, torch.stack([k[0], v[0]]).permute(2, 0, 1, 3))
    assert _adjacent_kv(k.clone(), v) is None  # another tensor
    assert _adjacent_kv(v, k) is None  # V before K
    assert _adjacent_kv(k, qkv[:, :, 5:7].transpose(1, 2)) is None  # overlapping heads


def test_compiled_forward_sees_one_opaque_attention_op_per_layer(llama):
    """Under torch.compile (fullgraph: no break) the paged attention of each layer is the
    shardserve::paged_attention op, not the cache's writes and gathers, and a FLAT step (a
    prompt, then a decode row on top of it) gives the eager logits."""
    attn = llama.layers[0].attention

    def new_cache():
        return PagedKVCache(n_layers=len(llama.layers), num_blocks=8, block_size=4,
                            n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim,
                            dtype=torch.float32)

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(llama, backend=backend, fullgraph=True, dynamic=True)
    prompt = [5, 9, 2, 7, 7, 1]
    outs = {}
    for name, fn in (("eager", llama), ("compiled", compiled)):
        cache, got = new_cache(), []
        for ids, start in ((prompt, 0), ([3], len(prompt))):
            n = len(ids)
            cache.set_flat_step(torch.tensor([[2, 0]]), torch.arange(start, start + n),
                                torch.tensor([n]))
            with torch.inference_mode():
                got.append(fn(torch.tensor([ids]), torch.arange(start, start + n)[None],
                              cache)[0])
        outs[name] = torch.cat(got)
    assert torch.allclose(outs["compiled"], outs["eager"], atol=1e-6)
    assert sum("shardserve.paged_attention" in t for t in seen) >= len(llama.layers)
    assert not any("index_copy" in t or "index_select" in t for t in seen)


@pytest.mark.parametrize("family,seed", [("convlm", 0), ("convlm", 1), ("convlm", 2),
                                         ("rnnlm", 0), ("rnnlm", 1)])
def test_state_slot_pool_equals_full_forward(convlm, rnnlm, family, seed):
    """Same ragged schedules over a slot pool with permuted slots, garbage in free slots and a
    second wave reusing the slots (a sequence at position 0 starts from a zero state)."""
    rng = random.Random(seed)
    model = convlm if family == "convlm" else rnnlm
    pool = StateSlotPool(model_spec(family).cache_spec(model), max_slots=12,
                         dtype=torch.float32)
    pool.pool.normal_(0, 100.0)
    for _wave in range(2):
        seqs = _prompts(rng, 5, 97)
        slots = rng.sample(range(12), len(seqs))
        ref = _full_logits(model, seqs)
        got = [torch.full_like(r, float("nan")) for r in ref]
        for step in _random_steps(rng, [len(s) for s in seqs]):
            tokens, positions, num_new = _batch(seqs, step, pad_positions="arange")
            sl = torch.tensor([slots[i] for i, _, _ in step])
            state = pool.set_step(sl, positions, num_new)
            with torch.inference_mode():
                out = model(tokens, positions, state)
            pool.end_step()
            for r, (i, start, n) in enumerate(step):
                got[i][start : start + n] = out[r, :n]
        for i in range(len(seqs)):
            assert rel_err(got[i], ref[i]) <= TOL, i


@pytest.mark.parametrize("family", ["llama", "convlm", "rnnlm"])
def test_model_runner_plans_equal_full_forward(llama, convlm, rnnlm, family):
    """ModelRunner.forward on wire-format plans (packed and unpacked) with logits_index: a
    decode row and a prefill chunk in the same plan, then their next tokens."""
    model = {"llama": llama, "convlm": convlm, "rnnlm": rnnlm}[family]
    runner = ModelRunner(model, CacheGeometry(64, block_size=4, max_slots=4), torch.float32)
    rng = random.Random(5)
    a, b = _prompts(rng, 2, 97, lo=9, hi=9)
    b_next = b + [17]
    ref_a, ref_b = _full_logits(model, [a, b_next])
    tables = {0: [3, 0, 7], 1: [5, 1, 9]} if family == "llama" else {0: [2], 1: [0]}

    def plan(rows):  # rows: (seq, start, token ids)
        t = max(len(ids) for _, _, ids in rows)
        toks = torch.zeros(len(rows), t, dtype=torch.long)
        pos = torch.empty(len(rows), t, dtype=torch.long)
        nb = max(len(tables[i]) for i, _, _ in rows)
        tab = torch.full((len(rows), nb), -1, dtype=torch.long)
        for r, (i, start, ids) in enumerate(rows):
            toks[r, : len(ids)] = torch.tensor(ids)
            pos[r] = torch.arange(start, start + t)
            tab[r, : len(tables[i])] = torch.tensor(tables[i])
        num_new = torch.tensor([len(ids) for _, _, ids in rows])
        p = ForwardPlan(toks, pos, num_new, num_new - 1, tab)
        return ForwardPlan.unpack(p.pack())

    out = runner.forward(plan([(0, 0, a[:5]), (1, 0, b)]))  # two prefill chunks
    assert rel_err(out[0], ref_a[4]) <= TOL and rel_err(out[1], ref_b[8]) <= TOL
    out = runner.forward(plan([(1, 9, b_next[9:]), (0, 5, a[5:])]))  # decode row + chunk
    assert rel_err(out[0], ref_b[9]) <= TOL and rel_err(out[1], ref_a[8]) <= TOL


def test_plan_wire_format_round_trips():
    p = ForwardPlan(torch.arange(6).view(2, 3), torch.arange(6).view(2, 3) + 10,
                    torch.tensor([3, 1]), torch.tensor([2, 0]), torch.tensor([[4, -1], [0, 2]]))
    q = ForwardPlan.unpack(p.pack())
    for name in ("tokens", "positions", "num_new", "logits_index", "tables"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    assert q.kind == 1
    flat = ForwardPlan(torch.arange(7).view(1, 7), torch.arange(7).view(1, 7) + 3,
                       torch.tensor([5, 1, 1]), torch.tensor([4, 5, 6]),
                       torch.tensor([[4, 2], [0, -1], [7, -1]]), kind=FLAT)
    g = ForwardPlan.unpack(flat.pack())
    for name in ("tokens", "positions", "num_new", "logits_index", "tables"):
        assert torch.equal(getattr(flat, name), getattr(g, name)), name
    assert g.flat and not q.flat
    assert ForwardPlan.unpack(ForwardPlan.stop().pack()).kind == 0
    assert ForwardPlan.unpack(ForwardPlan.keepalive().pack()).kind == 2


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_allocator_accounting(block_size):
    """Random grow/free traffic: blocks are never shared, used + free is constant, a table
    holds exactly ceil(tokens / block_size) blocks (waste < one block per sequence), running
    out raises MemoryError without losing blocks, and freeing everything returns them all."""
    rng = random.Random(block_size)
    alloc = BlockAllocator(40, block_size)
    tables: dict[int, tuple[list[int], int]] = {}
    for op in range(400):
        if tables and rng.random() < 0.25:
            k = rng.choice(list(tables))
            alloc.free(tables.pop(k)[0])
        else:
            k = rng.randrange(8)
            table, tokens = tables.get(k, ([], 0))
            new = tokens + rng.randint(0, 2 * block_size)
            free_before = alloc.free_blocks
            try:
                alloc.grow(table, new)
            except MemoryError:
                assert alloc.blocks_for(new) - len(table) > free_before
                assert alloc.free_blocks == free_before
                continue
            tables[k] = (table, new)
        owned = [b for t, _ in tables.values() for b in t]
        assert len(owned) == len(set(owned)) == alloc.used_blocks, op
        assert alloc.used_blocks + alloc.free_blocks == 40
        for t, tokens in tables.values():
            assert len(t) == -(-tokens // block_size)
            assert 0 <= len(t) * block_size - tokens < block_size
    for t, _ in tables.values():
        alloc.free(t)
    assert alloc.used_blocks == 0 and alloc.free_blocks == 40
    assert sorted(alloc.allocate(40)) == list(range(40))
    with pytest.raises(MemoryError):
        alloc.allocate(1)
    with pytest.raises(ValueError):
        BlockAllocator(0, block_size)
