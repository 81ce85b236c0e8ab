"""Tensor-parallel layers and collectives: TP=N logits, cached decoding and gradients equal TP=1
(threads), the thread collectives are ordered and fail instead of hanging, and a real two-process
gloo group serves and trains like the threads."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tp_cases import (
    gloo_rank_main,
    models,
    random_model,
    rel_err,
    tokens_for,
    tp_copies_logits,
    tp_grads,
    tps_of,
    write_model,
)

from shardserve_sharding.models import ConvLMConfig, LlamaConfig
from shardserve_sharding.models.rnnlm import RNNLMConfig
from shardserve_sharding.partition import TPGeometry, merge_shards, shard_spec, shard_tensor
from shardserve_sharding.reshard import reshard
from shardserve_sharding.split_table import SplitKind, split_kind
from shardserve_sharding.tp.apply import apply_tensor_parallel
from shardserve_sharding.tp.comm import ThreadGroup, run_ranks
from shardserve_sharding.tp.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

PROPERTY = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def _draw_tp(data, family, cfg) -> int:
    tps = tps_of(family, cfg)
    return data.draw(st.sampled_from(tps[1:] or tps), label="tp")  # TP > 1 whenever possible


# ---- logits --------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), fam_cfg=models)
def test_tp_logits_equal_tp1(data, fam_cfg):
    family, cfg = fam_cfg
    tp = _draw_tp(data, family, cfg)
    model = random_model(family, cfg, seed=data.draw(st.integers(0, 99), label="seed"))
    toks, pos = tokens_for(cfg)
    with torch.no_grad():
        ref = model(toks, pos)  # [B, T, V]
    outs = tp_copies_logits(model, tp, toks, pos)
    assert all(torch.equal(o, outs[0]) for o in outs)  # every rank ends with the same logits
    assert outs[0].shape == ref.shape  # the vocabulary padding is dropped
    assert rel_err(outs[0], ref) <= 1e-5, (tp, cfg)


def _decode(model, prompts: list[list[int]], steps: torch.Tensor) -> torch.Tensor:
    """Ragged prefill of `prompts` then one cached step per column of steps [B, S].

    Returns the logits of every step [B, S + 1, V] (the engine's calling convention).
    """
    bsz, n_steps = steps.shape
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    cache = model.new_cache(bsz, width + n_steps, dtype=torch.float32, device="cpu")
    toks = torch.zeros(bsz, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = torch.tensor(p)
    pos = torch.arange(width).expand(bsz, width)
    out = []
    with torch.no_grad():
        cache.begin_step(pos, lens)
        out.append(model(toks, pos, cache, logits_index=lens - 1))
        for s in range(n_steps):
            p = (lens + s)[:, None]
            cache.begin_step(p, torch.ones(bsz, dtype=torch.long))
            out.append(model(steps[:, s : s + 1], p, cache, logits_index=torch.zeros_like(lens)))
    return torch.stack(out, 1)


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fam_cfg=models)
def test_incremental_decoding_under_tp_equals_tp1(data, fam_cfg):
    family, cfg = fam_cfg
    tp = _draw_tp(data, family, cfg)
    model = random_model(family, cfg, seed=3)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99), label="seed"))
    lens = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label="lens")
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    steps = torch.randint(0, cfg.vocab_size, (len(lens), 4), generator=gen)
    ref = _decode(model, prompts, steps)
    # the cached TP=1 run is itself the full forward, row by row
    for i, p in enumerate(prompts):
        seq = torch.tensor(p + steps[i].tolist())[None]
        with torch.no_grad():
            full = model(seq, torch.arange(seq.shape[1])[None])[0, len(p) - 1 :]
        assert rel_err(ref[i], full) <= 1e-5

    def rank_fn(comm, rank):
        return _decode(apply_tensor_parallel(_copy(model), comm).eval(), prompts, steps)

    outs = run_ranks(tp, rank_fn)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert rel_err(outs[0], ref) <= 1e-5, (tp, cfg, lens)


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ---- gradients -----------------------------------------------------------------------------

GRAD_CASES = [
    # (family, config, tp); the first has one KV head on two ranks (replicated)
    (
        "llama",
        LlamaConfig(
            vocab_size=23,
            dim=12,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            intermediate_size=10,
            tie_embeddings=True,
            max_seq_len=32,
        ),
        2,
    ),
    (
        "llama",
        LlamaConfig(
            vocab_size=21,
            dim=16,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            intermediate_size=8,
            tie_embeddings=False,
            max_seq_len=32,
        ),
        2,
    ),
    (
        "llama",
        LlamaConfig(
            vocab_size=20,
            dim=24,
            n_layers=1,
            n_heads=6,
            n_kv_heads=2,
            intermediate_size=12,
            tie_embeddings=False,
            max_seq_len=32,
        ),
        6,
    ),
    (
        "convlm",
        ConvLMConfig(19, dim=6, hidden=4, n_layers=2, kernel_size=3, tie_embeddings=True),
        2,
    ),
    (
        "convlm",
        ConvLMConfig(25, dim=5, hidden=6, n_layers=2, kernel_size=2, tie_embeddings=False),
        3,
    ),
    ("rnnlm", RNNLMConfig(19, dim=6, hidden=4, n_layers=2, tie_embeddings=True), 2),
    ("rnnlm", RNNLMConfig(25, dim=5, hidden=6, n_layers=2, cell="gru", tie_embeddings=False), 3),
]


@pytest.mark.parametrize(
    "family,cfg,tp",
    GRAD_CASES,
    ids=["llama-kv-replicated", "llama-untied", "llama-tp6", "convlm-tied", "convlm-untied-tp3",
         "rnnlm-lstm-tied", "rnnlm-gru-untied-tp3"],
)
def test_tp_gradients_merge_to_tp1_gradients(family, cfg, tp):
    model = random_model(family, cfg, seed=5).train()
    toks, pos = tokens_for(cfg)
    targets, _ = tokens_for(cfg, seed=2)
    loss = F.cross_entropy(model(toks, pos).flatten(0, 1), targets.flatten())
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    grads = run_ranks(tp, lambda comm, rank: tp_grads(model, comm, toks, pos, targets))
    _check_merged_grads(family, cfg, tp, ref, grads)


def _check_merged_grads(family, cfg, tp, ref, grads) -> None:
    geo = TPGeometry.of(family, cfg)
    assert set(grads[0]) == set(ref)
    for name, g in ref.items():
        kind = split_kind(family, name)
        specs = [shard_spec(kind, tuple(g.shape), geo, tp, r) for r in range(tp)]
        local = [gr[name] for gr in grads]
        merged = merge_shards(local, specs, tuple(g.shape))
        assert rel_err(merged, g) <= 1e-5, (name, rel_err(merged, g))
        if kind is SplitKind.REPLICATED:  # every rank computed the same full gradient
            assert all(torch.equal(x, local[0]) for x in local), name
        for s, x in zip(specs, local, strict=True):
            if s.pad:  # padding rows get no gradient
                assert not x.narrow(s.dim, s.local_len - s.pad, s.pad).any(), name
        if kind is SplitKind.FUSED_QKV and tp > cfg.n_kv_heads:
            # replicas of a KV head hold identical gradients, so they stay identical
            for r in range(tp):
                for q in range(tp):
                    if specs[r].pieces[1:] == specs[q].pieces[1:]:
                        q_rows = specs[r].pieces[0][1] - specs[r].pieces[0][0]
                        assert torch.equal(local[r][q_rows:], local[q][q_rows:]), name


def test_parallel_linears_with_bias_forward_and_backward():
    """Bias handling the model families do not exercise: colwise bias split, rowwise bias once."""
    torch.manual_seed(0)
    col = torch.nn.Linear(6, 8, bias=True)
    row = torch.nn.Linear(8, 5, bias=True)
    emb = torch.nn.Embedding(7, 6)  # 7 rows at tp 2: padded to 8
    ids = torch.tensor([[0, 6, 3, 4]])
    y = row(F.gelu(col(emb(ids))))
    y.square().sum().backward()
    tp = 2
    geo = TPGeometry(vocab_size=7)

    def rank_fn(comm, rank):
        sc = shard_spec(SplitKind.COLWISE, (8, 6), geo, tp, rank)
        sr = shard_spec(SplitKind.ROWWISE, (5, 8), geo, tp, rank)
        sv = shard_spec(SplitKind.VOCAB, (7, 6), geo, tp, rank)
        sb = shard_spec(SplitKind.COLWISE, (8,), geo, tp, rank)
        e = VocabParallelEmbedding(4, 6, comm, vocab_start=4 * rank)
        c = ColumnParallelLinear(6, 4, comm, bias=True)
        r = RowParallelLinear(4, 5, comm, bias=True)
        with torch.no_grad():
            e.weight.copy_(shard_tensor(emb.weight, sv))
            c.weight.copy_(shard_tensor(col.weight, sc))
            c.bias.copy_(shard_tensor(col.bias, sb))
            r.weight.copy_(shard_tensor(row.weight, sr))
            r.bias.copy_(row.bias)
        out = r(F.gelu(c(e(ids))))
        out.square().sum().backward()
        return out.detach(), e.weight.grad, c.weight.grad, c.bias.grad, r.weight.grad, r.bias.grad

    res = run_ranks(tp, rank_fn)
    for o in res:
        assert rel_err(o[0], y.detach()) <= 1e-6
        assert rel_err(o[5], row.bias.grad) <= 1e-6  # the replicated bias sees the full grad
    g_emb = merge_shards(
        [o[1] for o in res],
        [shard_spec(SplitKind.VOCAB, (7, 6), geo, tp, r) for r in range(tp)],
        (7, 6),
    )
    assert rel_err(g_emb, emb.weight.grad) <= 1e-6
    assert rel_err(torch.cat([o[2] for o in res]), col.weight.grad) <= 1e-6
    assert rel_err(torch.cat([o[3] for o in res]), col.bias.grad) <= 1e-6
    assert rel_err(torch.cat([o[4] for o in res], 1), row.weight.grad) <= 1e-6


# ---- the thread collectives ----------------------------------------------------------------


def test_thread_collectives_are_ordered_and_identical_on_every_rank():
    def rank_fn(comm, rank):
        out = []
        for rnd in range(20):  # back-to-back rounds must not mix
            x = torch.full((3,), float(rank + 1)) * (rnd + 1) + torch.rand(3) * 1e-3
            s = comm.all_reduce(x.clone())
            g = comm.all_gather(torch.tensor([[rank * 100.0 + rnd]]))
            out.append((x, s, g))
        return out

    tp = 4
    res = run_ranks(tp, rank_fn)
    for rnd in range(20):
        xs = [res[r][rnd][0] for r in range(tp)]
        want = xs[0].clone()
        for x in xs[1:]:
            want += x  # rank order
        for r in range(tp):
            assert torch.equal(res[r][rnd][1], want)
            assert res[r][rnd][2].tolist() == [[q * 100.0 + rnd for q in range(tp)]]


def test_world_size_one_collectives_are_the_identity():
    comm = ThreadGroup(1).comm(0)
    x = torch.randn(3)
    assert comm.all_reduce(x) is x and comm.all_gather(x) is x


def test_a_failing_rank_fails_the_group_instead_of_hanging():
    def rank_fn(comm, rank):
        if rank == 1:
            raise KeyError("rank 1 broke")
        return comm.all_reduce(torch.ones(2))  # rank 0 waits here

    t0 = time.perf_counter()
    with pytest.raises(KeyError, match="rank 1 broke"):
        run_ranks(2, rank_fn)
    assert time.perf_counter() - t0 < 10


def test_a_missing_rank_times_out():
    group = ThreadGroup(2, timeout=0.5)
    errors = []

    def lonely():
        try:
            group.comm(0).all_reduce(torch.ones(1))
        except threading.BrokenBarrierError as e:
            errors.append(e)

    t = threading.Thread(target=lonely)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and len(errors) == 1


# ---- a real gloo group ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_gloo(world: int, jobs: list[tuple], out_dir, timeout: float = 90.0) -> list[list]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=gloo_rank_main, args=(r, world, port, str(out_dir), jobs))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, f"gloo ranks still running after {timeout} s"
    results = []
    for r in range(world):
        out = torch.load(out_dir / f"rank{r}.pt")
        assert "error" not in out, f"rank {r}: {out['error']}"
        results.append(out["results"])
    return results


@pytest.mark.slow
def test_two_process_gloo_group_serves_and_trains_like_tp1(tmp_path):
    llama = GRAD_CASES[0][1]  # one KV head replicated on both ranks, tied, vocab 23
    conv = ConvLMConfig(19, dim=6, hidden=4, n_layers=3, kernel_size=3, tie_embeddings=False)
    llama_model, conv_model = random_model("llama", llama, 7), random_model("convlm", conv, 8)
    write_model(tmp_path / "llama1", llama_model)
    write_model(tmp_path / "conv1", conv_model)
    reshard(tmp_path / "llama1", tmp_path / "llama2", tp=2)  # own rank files (fast path)
    reshard(tmp_path / "conv1", tmp_path / "conv1x3", tp=1, pp=3)  # slice reads over stages
    jobs = [
        ("load", str(tmp_path / "llama2")),
        ("load", str(tmp_path / "conv1x3")),
        ("grad", "llama", llama.to_dict(), 5),
    ]
    (tmp_path / "out").mkdir()
    res = _run_gloo(2, jobs, tmp_path / "out")
    for job, model in ((0, llama_model), (1, conv_model)):
        toks, pos = tokens_for(model.config)
        with torch.no_grad():
            ref = model(toks, pos)
        assert torch.equal(res[0][job], res[1][job])
        assert rel_err(res[0][job], ref) <= 1e-5
    # the backward collectives over gloo: merged gradients equal TP=1
    model = random_model("llama", llama, 5).train()
    toks, pos = tokens_for(llama)
    targets, _ = tokens_for(llama, seed=2)
    F.cross_entropy(model(toks, pos).flatten(0, 1), targets.flatten()).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    _check_merged_grads("llama", llama, 2, ref, [res[0][2], res[1][2]])
