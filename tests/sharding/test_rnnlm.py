"""RNNLM: logits == torch.nn.LSTM / GRU from the same weights, incremental == full, ragged
batches, TP 2 greedy == TP 1, config and split rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tp_cases import rel_err

from shardserve_sharding.models import checkpoint_names, model_spec
from shardserve_sharding.models.rnnlm import (
    RNNLM,
    RNNLM_CONFIGS,
    RecurrentState,
    RNNLMConfig,
    torch_gate_layout,
)
from shardserve_sharding.split_table import SplitKind, split_kind
from shardserve_sharding.tp.apply import apply_tensor_parallel
from shardserve_sharding.tp.comm import run_ranks

torch.set_num_threads(2)

CELLS = ["lstm", "gru"]


def make_model(cell: str, *, tied: bool = False, seed: int = 0, hidden: int = 12) -> RNNLM:
    cfg = RNNLMConfig(vocab_size=41, dim=16, hidden=hidden, n_layers=2, cell=cell,
                      tie_embeddings=tied, max_seq_len=64)
    torch.manual_seed(seed)
    model = RNNLM(cfg).eval()
    with torch.no_grad():  # move off the init so that every weight matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.4 * torch.randn_like(p))
    return model


@torch.no_grad()
def torch_reference(model: RNNLM, tokens: torch.Tensor) -> torch.Tensor:
    """The same network with torch.nn.LSTM / GRU layers (weights converted to torch's
    gate-major layout): logits [B, T, V]."""
    cfg = model.config
    rnn_cls = torch.nn.LSTM if cfg.cell == "lstm" else torch.nn.GRU
    x = F.embedding(tokens, model.tok_embeddings.weight)
    for blk in model.layers:
        rnn = rnn_cls(cfg.dim, cfg.hidden, batch_first=True)
        g = cfg.n_gates
        rnn.weight_ih_l0.copy_(torch_gate_layout(blk.w_ih.weight, g))
        rnn.weight_hh_l0.copy_(torch_gate_layout(blk.w_hh.weight, g))
        rnn.bias_ih_l0.copy_(torch_gate_layout(blk.w_ih.bias, g))
        rnn.bias_hh_l0.copy_(torch_gate_layout(blk.w_hh.bias, g))
        y, _ = rnn(F.rms_norm(x, (cfg.dim,), blk.norm.weight, cfg.norm_eps))
        x = x + y @ blk.proj.weight.t()
    x = F.rms_norm(x, (cfg.dim,), model.norm.weight, cfg.norm_eps)
    return x @ model.output.weight.t()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@torch.no_grad()
def test_logits_equal_torch_rnn_reference(cell, tied):
    model = make_model(cell, tied=tied, seed=3)
    tokens = torch.randint(0, 41, (3, 11))
    got = model(tokens, torch.arange(11).expand(3, 11))
    assert rel_err(got, torch_reference(model, tokens)) <= 1e-5
    assert torch.equal(torch_gate_layout(torch_gate_layout(model.layers[0].w_hh.weight, 4 if
                       cell == "lstm" else 3), 4 if cell == "lstm" else 3, to_torch=False),
                       model.layers[0].w_hh.weight)


@pytest.mark.parametrize("cell", CELLS)
@torch.no_grad()
def test_ragged_prefill_decode_and_select_match_rows_alone(cell):
    model = make_model(cell, seed=5)
    lens = torch.tensor([5, 2, 8, 1])
    bsz, t_max, n_decode = 4, 8, 4
    seqs = [torch.randint(0, 41, (int(n) + n_decode,)) for n in lens]
    alone = [model(s[None], torch.arange(len(s))[None])[0] for s in seqs]  # [n_b, V]
    cache = model.new_cache(bsz, 64, dtype=torch.float32, device="cpu")
    assert isinstance(cache, RecurrentState)
    tokens = torch.randint(0, 41, (bsz, t_max))  # padding columns hold random tokens
    for b in range(bsz):
        tokens[b, : lens[b]] = seqs[b][: lens[b]]
    pos = torch.arange(t_max).expand(bsz, t_max)
    cache.begin_step(pos, lens)
    full = model(tokens, pos, cache)
    for b in range(bsz):
        assert rel_err(full[b, : lens[b]], alone[b][: lens[b]]) <= 1e-5
    done = lens.clone()
    for step in range(n_decode):
        col = torch.stack([seqs[b][done[b]] for b in range(bsz)])[:, None]
        cache.begin_step(done[:, None].clone(), torch.ones(bsz, dtype=torch.long))
        out = model(col, done[:, None], cache, logits_index=torch.zeros(bsz, dtype=torch.long))
        for b in range(bsz):
            assert rel_err(out[b], alone[b][done[b]]) <= 1e-5
        done += 1
        if step == 1:  # drop row 3 and reorder: the kept rows keep their states
            keep = torch.tensor([2, 0, 1])
            cache.select(keep)
            seqs, alone, done, bsz = [seqs[i] for i in keep], [alone[i] for i in keep], \
                done[keep], 3


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding through the recurrent state (prefill, then one token per step)."""
    cache = model.new_cache(1, 64, dtype=torch.float32, device="cpu")
    toks = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            cache.begin_step(torch.zeros_like(toks), torch.tensor([toks.shape[1]]))
            logits = model(toks, torch.zeros_like(toks), cache,
                           logits_index=torch.tensor([toks.shape[1] - 1]))
            out.append(int(logits[0].argmax()))
            toks = torch.tensor([[out[-1]]])
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_tp2_greedy_identical_to_tp1(cell):
    model = make_model(cell, tied=cell == "gru", seed=11)
    prompt = [3, 17, 5, 40, 0]
    ref = _greedy(model, prompt, 12)
    tokens = torch.randint(0, 41, (2, 9))
    ref_logits = model(tokens, torch.arange(9).expand(2, 9)).detach()

    def rank_fn(comm, rank):
        local = apply_tensor_parallel(copy.deepcopy(model), comm).eval()
        with torch.no_grad():
            logits = local(tokens, torch.arange(9).expand(2, 9))
        return _greedy(local, prompt, 12), logits, local.new_cache(1, 8, dtype=torch.float32,
                                                                   device="cpu").state.shape

    for greedy, logits, state_shape in run_ranks(2, rank_fn):
        assert greedy == ref
        assert rel_err(logits, ref_logits) <= 1e-5
        assert state_shape[-1] == (12 if cell == "lstm" else 6)  # local units (and c) only


def test_config_roundtrip_split_rules_and_spec():
    for name, cfg in RNNLM_CONFIGS.items():
        assert RNNLMConfig.from_dict(cfg.to_dict()) == cfg, name
    with pytest.raises(ValueError, match="unknown rnnlm config keys.*kernel_size"):
        RNNLMConfig.from_dict({**RNNLM_CONFIGS["tiny"].to_dict(), "kernel_size": 3})
    with pytest.raises(ValueError, match="cell must be one of"):
        RNNLMConfig(vocab_size=5, cell="elman")
    tied = make_model("lstm", tied=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert "output.weight" not in checkpoint_names(tied)
    got = {k: tuple(v.shape) for k, v in make_model("gru").named_parameters()}
    assert got["layers.1.w_ih.weight"] == (36, 16) and got["layers.1.w_hh.weight"] == (36, 12)
    kinds = {n: split_kind("rnnlm", n) for n in got}
    assert kinds["layers.0.w_hh.bias"] is SplitKind.COLWISE
    assert kinds["layers.0.proj.weight"] is SplitKind.ROWWISE
    spec = model_spec("rnnlm")
    assert spec.named_config("tiny-gru").cell == "gru"
    assert spec.cache_spec(tied).state_shape == (24,)  # h and c of 12 units
    with torch.device("meta"):
        assert RNNLM(RNNLM_CONFIGS["tiny"]).tok_embeddings.weight.is_meta


@torch.no_grad()
def test_bf16_close_to_fp32():
    model = make_model("lstm", seed=2)
    tokens = torch.randint(0, 41, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    ref = model(tokens, pos)
    model.to(torch.bfloat16)
    cache = model.new_cache(2, 10, dtype=torch.bfloat16, device="cpu")
    cache.begin_step(pos, torch.tensor([10, 10]))
    got = model(tokens, pos, cache)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 5e-2
