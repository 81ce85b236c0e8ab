"""Megatron-LM (legacy, Megatron-Core local and TE, PP > 1, padded vocab, tied) and PyTorch DCP
(torchtitan names and rotary convention) checkpoints reshard to models with the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from megatron_writer import write_megatron

from shardserve_sharding.checkpoint.manifest import CheckpointError
from shardserve_sharding.importers import detect_format, open_source
from shardserve_sharding.models import build_model, checkpoint_names
from shardserve_sharding.models.llama import LlamaConfig, Transformer
from shardserve_sharding.tokenizer import train_bpe

CORPUS = [
    "the quick brown fox jumps over the lazy dog " * 4,
    "def f(x):\n    return x * 2\n",
    "naïve café 東京 🙂 12345",
] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=300)


def make_model(tok, *, tied: bool, n_heads=4, n_kv=2, layers=4) -> Transformer:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        dim=32,
        n_layers=layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        intermediate_size=48,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=tied,
        max_seq_len=128,
    )
    m = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm shows up
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))


def model_from_source(src) -> Transformer:
    m = build_model("llama", src.config)
    state = {n: src.tensor(n) for n, _ in src.names_and_shapes()}
    m.load_state_dict(state, strict=False)
    return m.eval()


def assert_same_logits(ref_model, src):
    toks = torch.randint(
        0, ref_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    ref = logits_of(ref_model, toks)
    out = logits_of(model_from_source(src), toks)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def state_of(model):
    sd = dict(model.named_parameters())
    return {n: sd[n].detach().clone() for n in checkpoint_names(model)}


@pytest.mark.parametrize(
    "style,tp,pp,tied,spelling",
    [
        ("legacy", 2, 1, True, "layernorm"),
        ("legacy", 1, 2, True, "norm"),
        ("core", 2, 2, False, "layernorm"),
        ("core", 1, 1, True, "layernorm"),
        ("te", 2, 2, True, "layernorm"),
    ],
)
def test_megatron_reads_back_the_model(tmp_path, tokenizer, style, tp, pp, tied, spelling):
    model = make_model(tokenizer, tied=tied)
    root = write_megatron(
        tmp_path / "mg",
        state_of(model),
        model.config,
        tp=tp,
        pp=pp,
        style=style,
        norm_spelling=spelling,
        iteration=None if style == "legacy" else 1200,
    )
    assert detect_format(root) == "megatron"
    src = open_source(root, tokenizer=tokenizer)
    assert src.config == model.config
    assert_same_logits(model, src)


def test_megatron_padded_vocab_is_stripped(tmp_path, tokenizer):
    model = make_model(tokenizer, tied=False)
    root = write_megatron(
        tmp_path / "mg", state_of(model), model.config, tp=2, pp=1, style="core", divisible=128
    )
    src = open_source(root, tokenizer=tokenizer)
    assert src.padded_vocab == 256 * ((tokenizer.vocab_size + 255) // 256)
    assert src.tensor("tok_embeddings.weight").shape[0] == tokenizer.vocab_size


def test_megatron_wrong_tokenizer_and_missing_rank(tmp_path, tokenizer):
    model = make_model(tokenizer, tied=True)
    root = write_megatron(tmp_path / "mg", state_of(model), model.config, tp=2, pp=2)
    small = train_bpe(CORPUS[:1], vocab_size=270)
    if small.vocab_size < tokenizer.vocab_size - 8:
        with pytest.raises(CheckpointError, match="wrong tokenizer"):
            open_source(root, tokenizer=small)
    victim = root / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    victim.unlink()
    with pytest.raises(CheckpointError, match="mp_rank_01_001"):
        open_source(root, tokenizer=tokenizer)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/shardserve_pwned",))


def test_malicious_pickle_is_refused(tmp_path, tokenizer):
    model = make_model(tokenizer, tied=True)
    root = write_megatron(tmp_path / "mg", state_of(model), model.config, tp=1, pp=1)
    path = root / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ck = torch.load(path, weights_only=False)
    ck["evil"] = _Evil()
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        open_source(root, tokenizer=tokenizer)
    assert not os.path.exists("/tmp/shardserve_pwned")


def interleave_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta/torchtitan interleaved rows (inverse of our unpermute)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, w.shape[1]).transpose(1, 2).reshape(w.shape)


def torchtitan_state(model: Transformer, fused: bool, prefix: str) -> dict[str, torch.Tensor]:
    c = model.config
    d = c.head_dim
    out = {
        prefix + "tok_embeddings.weight": model.tok_embeddings.weight.detach().clone(),
        prefix + "norm.weight": model.norm.weight.detach().clone(),
    }
    if not c.tie_embeddings:
        out[prefix + "output.weight"] = model.output.weight.detach().clone()
    for i, layer in enumerate(model.layers):
        p = f"{prefix}layers.{i}."
        q, k, v = layer.attention.wqkv.weight.detach().split(
            [c.n_heads * d, c.n_kv_heads * d, c.n_kv_heads * d]
        )
        mid = "attention.qkv_linear." if fused else "attention."
        out[p + mid + "wq.weight"] = interleave_rope(q, c.n_heads).clone()
        out[p + mid + "wk.weight"] = interleave_rope(k, c.n_kv_heads).clone()
        out[p + mid + "wv.weight"] = v.clone()
        out[p + "attention.wo.weight"] = layer.attention.wo.weight.detach().clone()
        w1, w3 = layer.feed_forward.w13.weight.detach().chunk(2)
        out[p + "feed_forward.w1.weight"] = w1.clone()
        out[p + "feed_forward.w3.weight"] = w3.clone()
        out[p + "feed_forward.w2.weight"] = layer.feed_forward.w2.weight.detach().clone()
        out[p + "attention_norm.weight"] = layer.attention_norm.weight.detach().clone()
        out[p + "ffn_norm.weight"] = layer.ffn_norm.weight.detach().clone()
    return out


@pytest.mark.parametrize("fused,prefix,tied", [(False, "", False), (True, "model.", True)])
def test_dcp_torchtitan_reads_back_the_model(tmp_path, tokenizer, fused, prefix, tied):
    model = make_model(tokenizer, tied=tied)
    c = model.config
    dcp.save(
        torchtitan_state(model, fused, prefix), checkpoint_id=str(tmp_path / "dcp"), no_dist=True
    )
    params = tmp_path / "params.json"
    params.write_text(
        json.dumps(
            {
                "dim": c.dim,
                "n_layers": c.n_layers,
                "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads,
                "rope_theta": c.rope_theta,
                "norm_eps": c.norm_eps,
                "max_seq_len": c.max_seq_len,
            }
        )
    )
    assert detect_format(tmp_path / "dcp") == "dcp"
    src = open_source(tmp_path / "dcp", config=params, tokenizer=tokenizer)
    assert src.config == c
    assert_same_logits(model, src)
    with pytest.raises(CheckpointError, match="needs --config"):
        open_source(tmp_path / "dcp")


def test_dcp_malicious_metadata_is_refused(tmp_path):
    import pickle

    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        open_source(d, config=tmp_path / "p.json")
