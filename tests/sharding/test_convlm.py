"""ConvLM: incremental decoding == full recomputation, causality, learning, config, bf16."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from shardserve_sharding.models import checkpoint_names
from shardserve_sharding.models.convlm import CONVLM_CONFIGS, ConvLM, ConvLMConfig, ConvState
from shardserve_sharding.split_table import split_kind

torch.set_num_threads(2)

# (vocab, dim, hidden, n_layers, kernel, tied): kernel 1 has an empty state; 2/3/5 ring it.
SHAPES = [
    (37, 16, 24, 2, 3, True),
    (50, 24, 16, 3, 5, False),
    (29, 8, 8, 1, 2, True),
    (31, 16, 8, 2, 1, False),
]


def make_model(shape, seed: int) -> ConvLM:
    vocab, dim, hidden, n_layers, kernel, tied = shape
    cfg = ConvLMConfig(
        vocab_size=vocab, dim=dim, hidden=hidden, n_layers=n_layers, kernel_size=kernel,
        tie_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = ConvLM(cfg).eval()
    with torch.no_grad():  # move off the near-zero init so differences would show
        for name, p in model.named_parameters():
            if name.endswith(("conv.bias", "norm.weight")):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("proj.weight"):
                p.normal_(std=0.3)
    return model


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert diff <= rel * scale, f"max|diff| {diff:.3e} > {rel} * max|ref| {scale:.3e}"


def positions_for(start: torch.Tensor, t: int) -> torch.Tensor:
    return start[:, None] + torch.arange(t)[None, :]  # [B, T]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s[0]}d{s[1]}h{s[2]}L{s[3]}k{s[4]}")
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(shape):
    model = make_model(shape, seed=sum(shape[:5]))
    vocab, bsz, n, prefix = shape[0], 2, 13, 5
    tokens = torch.randint(0, vocab, (bsz, n))
    ref = model(tokens, positions_for(torch.zeros(bsz, dtype=torch.long), n))  # [B, n, V]

    cache = model.new_cache(bsz, n, dtype=torch.float32, device="cpu")
    assert isinstance(cache, ConvState)
    cache.begin_step(positions_for(torch.zeros(bsz, dtype=torch.long), prefix),
                     torch.full((bsz,), prefix))
    got = [model(tokens[:, :prefix], positions_for(torch.zeros(bsz, dtype=torch.long), prefix),
                 cache)]  # [B, prefix, V]
    for t in range(prefix, n):
        pos = torch.full((bsz, 1), t)
        cache.begin_step(pos, torch.ones(bsz, dtype=torch.long))
        got.append(model(tokens[:, t : t + 1], pos, cache))  # [B, 1, V]
    assert_close(torch.cat(got, dim=1), ref)

    # logits_index picks one column per row and matches the full logits there.
    idx = torch.tensor([3, n - 1])
    one = model(tokens, positions_for(torch.zeros(bsz, dtype=torch.long), n), logits_index=idx)
    assert one.shape == (bsz, vocab)
    assert_close(one, ref[torch.arange(bsz), idx])


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"L{s[3]}k{s[4]}")
@torch.no_grad()
def test_ragged_batch_select_and_idle_rows_match_rows_alone(shape):
    model = make_model(shape, seed=7 + shape[4])
    vocab = shape[0]
    lens = torch.tensor([5, 2, 8, 1])
    bsz, t_max, n_decode = len(lens), int(lens.max()), 5
    # Each row's whole real sequence; row 1 sits out decode step 2 (num_new 0).
    idle = {(1, 2)}
    total = [int(lens[b]) + n_decode - sum(1 for r, _ in idle if r == b) for b in range(bsz)]
    seqs = [torch.randint(0, vocab, (total[b],)) for b in range(bsz)]
    alone = [model(s[None], torch.arange(len(s))[None])[0] for s in seqs]  # [n_b, V] each

    cache = model.new_cache(bsz, 64, dtype=torch.float32, device="cpu")
    tokens = torch.randint(0, vocab, (bsz, t_max))  # padding columns hold random tokens
    for b in range(bsz):
        tokens[b, : lens[b]] = seqs[b][: lens[b]]
    pos = positions_for(torch.zeros(bsz, dtype=torch.long), t_max)
    cache.begin_step(pos, lens)
    full = model(tokens, pos, cache)  # [B, T, V]
    for b in range(bsz):
        assert_close(full[b, : lens[b]], alone[b][: lens[b]])

    done = lens.clone()  # tokens consumed per row
    for step in range(n_decode):
        num_new = torch.tensor([0 if (b, step) in idle else 1 for b in range(bsz)])
        col = torch.randint(0, vocab, (bsz, 1))  # idle rows get a junk padding token
        for b in range(bsz):
            if num_new[b]:
                col[b, 0] = seqs[b][done[b]]
        pos = done[:, None].clone()
        cache.begin_step(pos, num_new)
        out = model(col, pos, cache, logits_index=torch.zeros(bsz, dtype=torch.long))  # [B, V]
        for b in range(bsz):
            if num_new[b]:
                assert_close(out[b], alone[b][done[b]])
        done += num_new
        if step == 1:  # drop row 3 and reorder: the kept rows keep their states
            keep = torch.tensor([2, 0, 1])
            cache.select(keep)
            assert cache.state.shape[1] == 3
            seqs = [seqs[i] for i in keep]
            alone = [alone[i] for i in keep]
            done = done[keep]
            idle = {(int((keep == r).nonzero()), s) for r, s in idle}
            bsz = 3
    assert [int(d) for d in done] == [len(s) for s in seqs]


@torch.no_grad()
def test_causal_and_finite_receptive_field():
    cfg = ConvLMConfig(vocab_size=40, dim=16, hidden=16, n_layers=3, kernel_size=4)
    torch.manual_seed(3)
    model = ConvLM(cfg).eval()
    n, t = 30, 9
    tokens = torch.randint(0, cfg.vocab_size, (1, n))
    pos = torch.arange(n)[None]
    ref = model(tokens, pos)
    changed = tokens.clone()
    changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
    out = model(changed, pos)
    assert torch.equal(out[:, :t], ref[:, :t]), "a future token changed earlier logits"
    assert (out[:, t] - ref[:, t]).abs().max() > 0
    r = cfg.receptive_field  # 10: outputs at >= t + r never see token t
    assert (out[:, t : t + r] - ref[:, t : t + r]).abs().amax(-1).min() > 0
    assert torch.equal(out[:, t + r :], ref[:, t + r :])


def fib_batch(gen: torch.Generator, bsz: int, n: int, vocab: int) -> torch.Tensor:
    """x_0, x_1 uniform per sequence, then x_t = (x_{t-1} + x_{t-2}) mod vocab."""
    x = torch.empty(bsz, n, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab, (bsz, 2), generator=gen)
    for t in range(2, n):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % vocab
    return x


def test_learns_two_token_rule_beyond_unigram():
    # A unigram model cannot predict Fibonacci mod V (near uniform marginals) and neither can
    # a bigram one; a conv that sees the last two tokens can, except at the first target.
    vocab, n, bsz, steps = 10, 24, 32, 200
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = ConvLMConfig(vocab_size=vocab, dim=64, hidden=64, n_layers=2, kernel_size=3)
    model = ConvLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    pos = torch.arange(n)[None].expand(bsz, n)
    counts = torch.zeros(vocab)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = fib_batch(gen, bsz, n, vocab)
        counts += torch.bincount(x[:, 1:].flatten(), minlength=vocab)
        logits = model(x[:, :-1], pos[:, :-1])  # [B, n-1, V]
        loss = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0

    probs = counts / counts.sum()
    unigram = -(probs * probs.log()).sum().item()  # entropy of the training targets, nats
    model.eval()
    with torch.no_grad():
        x = fib_batch(torch.Generator().manual_seed(12345), 256, n, vocab)
        logits = model(x[:, :-1], pos[:1, :-1].expand(256, n - 1))
        ce = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1)).item()
    floor = math.log(vocab) / (n - 1)  # only the first target (x_1) is unpredictable
    print(f"\nfib mod {vocab}: held-out CE {ce:.4f} nats, unigram entropy {unigram:.4f}, "
          f"floor {floor:.4f}, final train loss {loss.item():.4f}, "
          f"{steps} steps in {train_s:.1f}s")
    assert ce < 0.5 * unigram


def test_config_roundtrip_tying_and_parameter_names():
    cfg = CONVLM_CONFIGS["article"]
    assert (cfg.dim, cfg.hidden, cfg.kernel_size) == (128, 128, 5)
    assert ConvLMConfig.from_dict(cfg.to_dict()) == cfg
    assert ConvLMConfig.from_dict(CONVLM_CONFIGS["tiny"].to_dict()) == CONVLM_CONFIGS["tiny"]
    with pytest.raises(ValueError, match="unknown convlm config keys.*n_heads"):
        ConvLMConfig.from_dict({**cfg.to_dict(), "n_heads": 4})

    c = ConvLMConfig(vocab_size=11, dim=6, hidden=5, n_layers=2, kernel_size=3)
    tied = ConvLM(c)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert checkpoint_names(tied)[0] == "tok_embeddings.weight"
    assert "output.weight" not in checkpoint_names(tied)
    untied = ConvLM(ConvLMConfig(**{**c.to_dict(), "tie_embeddings": False}))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert "output.weight" in checkpoint_names(untied)

    expected = {"tok_embeddings.weight": (11, 6), "norm.weight": (6,), "output.weight": (11, 6)}
    for i in range(2):
        expected |= {
            f"layers.{i}.norm.weight": (6,), f"layers.{i}.conv.weight": (10, 6, 3),
            f"layers.{i}.conv.bias": (10,), f"layers.{i}.proj.weight": (6, 5),
        }
    got = {k: tuple(v.shape) for k, v in untied.named_parameters()}
    assert got == expected
    for name in got:
        split_kind("convlm", name)  # every parameter has a split rule
    with torch.device("meta"):  # the checkpoint loader builds on meta first
        assert ConvLM(c).tok_embeddings.weight.is_meta


@torch.no_grad()
def test_bf16_close_to_fp32():
    torch.manual_seed(5)
    cfg = ConvLMConfig(vocab_size=64, dim=32, hidden=32, n_layers=2, kernel_size=5)
    model = ConvLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    pos = torch.arange(12)[None].expand(2, 12)
    ref = model(tokens, pos)
    model.to(torch.bfloat16)
    full = model(tokens, pos)
    assert full.dtype == torch.bfloat16
    assert_close(full, ref, rel=5e-2)
    cache = model.new_cache(2, 12, dtype=torch.bfloat16, device="cpu")
    cache.begin_step(pos[:, :7], torch.tensor([7, 7]))
    steps = [model(tokens[:, :7], pos[:, :7], cache)]
    for t in range(7, 12):
        cache.begin_step(pos[:, t : t + 1], torch.tensor([1, 1]))
        steps.append(model(tokens[:, t : t + 1], pos[:, t : t + 1], cache))
    inc = torch.cat(steps, dim=1)
    assert inc.dtype == torch.bfloat16
    assert_close(inc, ref, rel=5e-2)
