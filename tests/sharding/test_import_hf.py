"""Hugging Face import: tiny random transformers Llamas (tied/untied, GQA/MHA, non-default rope
theta, single file and sharded with an index) give the same logits as transformers after
`import_model`; unsupported or incomplete directories fail clearly and leave no output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from shardserve_sharding.checkpoint.io import load_model
from shardserve_sharding.checkpoint.manifest import CheckpointError, read_manifest
from shardserve_sharding.importers import import_model
from shardserve_sharding.tokenizer import train_bpe

VOCAB = 300

CASES = {
    # name: (LlamaConfig kwargs, save_pretrained kwargs)
    "tied-gqa": (dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), {}),
    "untied-gqa-theta": (
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
             rope_theta=123456.0, rms_norm_eps=1e-5),
        {},
    ),
    "untied-mha": (dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False),
                   {}),
    "sharded-untied-gqa": (
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             rope_theta=50000.0),
        {"max_shard_size": "40KB"},
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog 1234567890"] * 10,
                     vocab_size=VOCAB)


def hf_model(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      max_position_embeddings=128, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # every tensor distinct and far from its init: mix-ups show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_hf(model, directory: Path, tokenizer, **save_kw) -> Path:
    model.save_pretrained(directory, safe_serialization=True, **save_kw)
    tokenizer.save(directory)  # tokenizer.json + tokenizer_config.json
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer) -> Path:
    """One saved HF directory that the failure tests damage copies of (sharded, with index)."""
    kw, save_kw = CASES["sharded-untied-gqa"]
    return save_hf(hf_model(**kw), tmp_path_factory.mktemp("hf") / "src", tokenizer, **save_kw)


@torch.inference_mode()
@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(tmp_path, tokenizer, case):
    kw, save_kw = CASES[case]
    ref_model = hf_model(**kw)
    src = save_hf(ref_model, tmp_path / "src", tokenizer, **save_kw)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    if save_kw:
        assert len(shards) > 2 and (src / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"]
    dst = import_model(src, tmp_path / "out")
    m = read_manifest(dst)
    c = ref_model.config
    assert m.source["format"] == "hf" and m.family == "llama"
    assert m.config["n_heads"] == c.num_attention_heads
    assert m.config["n_kv_heads"] == c.num_key_value_heads
    assert m.config["tie_embeddings"] == c.tie_word_embeddings
    assert m.config["rope_theta"] == kw.get("rope_theta", 10000.0)
    assert m.config["max_seq_len"] == 128 and m.config["norm_eps"] == c.rms_norm_eps
    assert ("output.weight" in m.tensors) is not c.tie_word_embeddings

    loaded = load_model(dst, verify_hashes=True)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(5))
    ref = ref_model(tokens).logits  # [2, T, V]
    ours = loaded.model(tokens, torch.arange(48).expand(2, 48))
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    text = "the lazy fox 42"
    assert loaded.tokenizer.encode(text) == tokenizer.encode(text)


def test_bf16_import_holds_the_rounded_weights(tmp_path, tokenizer):
    kw, _ = CASES["tied-gqa"]
    ref = hf_model(**kw)
    src = save_hf(ref, tmp_path / "src", tokenizer)
    dst = import_model(src, tmp_path / "out", dtype=torch.bfloat16)
    assert read_manifest(dst).dtype == "bfloat16"
    got = load_model(dst, dtype=torch.bfloat16).model
    sa = ref.model.layers[1].self_attn
    wqkv = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]).to(torch.bfloat16)
    assert torch.equal(got.layers[1].attention.wqkv.weight, wqkv)
    assert torch.equal(got.tok_embeddings.weight, ref.model.embed_tokens.weight.bfloat16())


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _copy(hf_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(hf_dir, dst)
    return dst


def _assert_fails_cleanly(src: Path, tmp_path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as err:
        import_model(src, tmp_path / "out")
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no out/, no .out.*.partial
    return msg


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.update(model_type="gpt2"), ["model_type 'gpt2'"]),
        (lambda d: d.pop("model_type"), ["model_type None"]),
        (lambda d: d.update(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                             "rope_theta": 10000.0}), ["rope_type 'linear'"]),
        (lambda d: d.update(rope_scaling={"type": "dynamic", "factor": 2.0}), ["rope_scaling"]),
        (lambda d: d.update(attention_bias=True), ["bias"]),
        (lambda d: d.update(head_dim=16), ["head_dim"]),
    ],
    ids=["gpt2", "no-model-type", "rope-linear", "rope-scaling", "bias", "head-dim"],
)
def test_unsupported_config_names_config_json(hf_dir, tmp_path, edit, words):
    src = _copy(hf_dir, tmp_path)
    _edit_json(src / "config.json", edit)
    _assert_fails_cleanly(src, tmp_path, str(src / "config.json"), *words)


def test_missing_shard_listed_in_index_names_it(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).unlink()
    _assert_fails_cleanly(src, tmp_path, str(src / shard), "missing")


def test_tensor_missing_from_index_fails_midway_and_leaves_nothing(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"  # read late, after files were written
    _edit_json(src / "model.safetensors.index.json", lambda d: d["weight_map"].pop(name))
    _assert_fails_cleanly(src, tmp_path, name)


def test_missing_config_and_pickle_only_directories(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="cannot tell the format"):
        import_model(src, tmp_path / "out")
    kw, _ = CASES["tied-gqa"]
    (src / "config.json").write_text(hf_model(**kw).config.to_json_string())
    _assert_fails_cleanly(src, tmp_path, str(src), "no *.safetensors")
