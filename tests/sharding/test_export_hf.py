"""`shardserve export-hf`: tiny Llamas resharded to TP=2 and TP=3 x PP=2 (vocabulary padded)
export to Hugging Face directories that transformers loads with logits within 1e-5 of our
model (fp32) and bf16 weights bit-equal to ours; `shardserve import` of the export gives back
identical tensors; transformers' AutoTokenizer encodes and renders the chat template as ours
does (BOS added where ours adds it); other families, existing outputs and interrupted exports
fail clearly and leave nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardserve_server.cli import main as cli
from shardserve_sharding.checkpoint.io import load_model, write_checkpoint
from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
from shardserve_sharding.checkpoint.source import ShardserveSource
from shardserve_sharding.hf_export import export_hf
from shardserve_sharding.importers import import_model
from shardserve_sharding.models import build_model, checkpoint_names
from shardserve_sharding.models.llama import LlamaConfig
from shardserve_sharding.reshard import reshard
from shardserve_sharding.tokenizer import train_bpe

TEXTS = ["the quick brown fox jumps over the lazy dog.", "  4 and\n 5 naïve café 東京 🙂",
         "<|im_start|>user\nhello there<|im_end|>\n", ""]


@pytest.fixture(scope="module")
def gqa3_dir(tmp_path_factory) -> Path:
    """An untied tiny Llama with 6 query / 3 KV heads (TP=3 valid), TP=1, distinct weights."""
    tok = train_bpe(TEXTS * 20, vocab_size=320)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=6, n_kv_heads=3,
                      intermediate_size=96, rope_theta=500000.0, norm_eps=1e-5,
                      tie_embeddings=False, max_seq_len=256)
    torch.manual_seed(3)
    model = build_model("llama", cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():  # norms far from 1: a swapped norm would show in the logits
        for n, p in params.items():
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if "norm" in n else 0.2 * torch.randn_like(p))
    names = checkpoint_names(model)
    dst = tmp_path_factory.mktemp("gqa3") / "ckpt"
    write_checkpoint(dst, family="llama", config=cfg.to_dict(),
                     tensors=((n, params[n].detach()) for n in names),
                     specs=[TensorSpec(n, torch.float32, tuple(params[n].shape)) for n in names],
                     tokenizer=tok, source={"format": "test-random"})
    return dst


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_llama_dir, gqa3_dir) -> dict[str, tuple[Path, Path]]:
    """name -> (the TP=1 original, the same model resharded)."""
    root = tmp_path_factory.mktemp("layouts")
    reshard(tiny_llama_dir, root / "tied-tp2", tp=2)
    reshard(gqa3_dir, root / "untied-tp3-pp2", tp=3, pp=2)
    return {"tied-tp2": (tiny_llama_dir, root / "tied-tp2"),
            "untied-tp3-pp2": (gqa3_dir, root / "untied-tp3-pp2")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, layouts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (_, sharded) in layouts.items():
        assert cli(["export-hf", str(sharded), str(root / name), "--quiet"]) == 0
        out[name] = root / name
    return out


@torch.inference_mode()
@pytest.mark.parametrize("case", ["tied-tp2", "untied-tp3-pp2"])
def test_transformers_logits_equal_ours(layouts, exported, case):
    from transformers import AutoModelForCausalLM

    hf_dir = exported[case]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= keys
    assert ("lm_head.weight" in keys) == (case.startswith("untied"))  # tied: stored once
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = load_model(layouts[case][0], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 24), generator=gen)
    ref = ours.model(tokens, torch.arange(24).expand(2, 24))
    got = hf(tokens).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_import_of_the_export_gives_identical_tensors(layouts, exported, tmp_path):
    for case, hf_dir in exported.items():
        back = import_model(hf_dir, tmp_path / case)
        a, b = ShardserveSource(layouts[case][0]), ShardserveSource(back)
        assert a.config == b.config
        assert a.names_and_shapes() == b.names_and_shapes()
        for name, _ in a.names_and_shapes():
            assert torch.equal(a.tensor(name), b.tensor(name)), (case, name)


def test_tokenizer_loads_in_transformers_and_encodes_like_ours(layouts, exported):
    from transformers import AutoTokenizer

    hf_dir = exported["tied-tp2"]
    ours = load_model(layouts["tied-tp2"][0]).tokenizer
    hf = AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and now?"}]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        ours.apply_chat_template(chat, add_generation_prompt=True))
    assert hf.eos_token_id == ours.eos_token_id
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eos_token_id


def test_bos_is_added_by_transformers_where_ours_adds_it(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_model(tiny_llama_dir).tokenizer
    bos_tok = dataclasses.replace(tok, bos_token_id=tok.tokenizer.token_to_id("<|im_start|>"),
                                  add_bos_token=True)
    bos_tok.save(tmp_path / "tok")
    reshard(tiny_llama_dir, tmp_path / "ckpt", tp=1, tokenizer=tmp_path / "tok")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ids = bos_tok.encode(text)
        assert ids[0] == bos_tok.bos_token_id
        assert hf(text)["input_ids"] == ids, text
    back = import_model(tmp_path / "hf", tmp_path / "back")
    again = load_model(back).tokenizer
    assert [again.encode(t) for t in TEXTS] == [bos_tok.encode(t) for t in TEXTS]  # no 2nd BOS


@torch.inference_mode()
def test_bf16_export_holds_our_bf16_weights(layouts, tmp_path):
    from transformers import AutoModelForCausalLM

    orig, sharded = layouts["untied-tp3-pp2"]
    rep = export_hf(sharded, tmp_path / "hf", dtype="bf16")
    assert rep.dtype == "bfloat16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    src = ShardserveSource(orig)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    state = hf.state_dict()
    q = src.tensor("layers.1.attention.wqkv.weight").to(torch.bfloat16)
    n_q = src.config.n_heads * src.config.head_dim
    assert state["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], q[:n_q])
    up = src.tensor("layers.0.feed_forward.w13.weight").to(torch.bfloat16)
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"],
                       up[src.config.intermediate_size:])


def test_other_families_are_refused_in_one_line(tiny_convlm_dir, tmp_path, capsys):
    assert cli(["export-hf", str(tiny_convlm_dir), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Llama family only" in err and "'convlm'" in err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(exported, layouts, capsys):
    hf_dir = exported["tied-tp2"]
    before = (hf_dir / "model.safetensors").stat().st_mtime_ns
    assert cli(["export-hf", str(layouts["tied-tp2"][1]), str(hf_dir), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (hf_dir / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_export_leaves_nothing(layouts, tmp_path, monkeypatch):
    import shardserve_sharding.hf_export as hf_export

    def fail(*_args):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(hf_export, "_check", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        export_hf(layouts["tied-tp2"][1], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_read_back_check_catches_a_wrong_tensor(layouts, tmp_path, monkeypatch):
    """The check inside export compares what the HF importer reads with the checkpoint."""
    import shardserve_sharding.hf_export as hf_export
    from shardserve_sharding.checkpoint.manifest import CheckpointError

    real = hf_export.SafetensorsStreamWriter.write

    def flip(self, name, tensor):
        if name == "model.layers.0.self_attn.v_proj.weight":
            tensor = -tensor
        return real(self, name, tensor)

    monkeypatch.setattr(hf_export.SafetensorsStreamWriter, "write", flip)
    with pytest.raises(CheckpointError, match="wqkv.*does not read back"):
        export_hf(layouts["tied-tp2"][1], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
