"""GGUF import of the bundled SmolLM2: logits and greedy tokens match transformers; bad files fail
clearly and leave nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shardserve_sharding.checkpoint.manifest import CheckpointError, read_manifest
from shardserve_sharding.importers import import_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Les chats et les chiens sont",
]


def test_manifest_describes_smollm2(smollm2_dir):
    m = read_manifest(smollm2_dir)
    assert m.family == "llama" and m.layout.tp == 1 and m.layout.pp == 1
    assert m.config["n_layers"] == 30 and m.config["n_kv_heads"] == 3
    assert m.tensors["layers.0.attention.wqkv.weight"].shape == (960, 576)
    assert m.tensors["layers.0.attention.wqkv.weight"].split == "fused_qkv"
    assert "output.weight" not in m.tensors  # tied: stored once
    assert any(f.startswith("tokenizer/") for f in m.files)
    assert m.source["format"] == "gguf"


@torch.inference_mode()
def test_logits_match_transformers(smollm2, hf_smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf_smollm2(ids).logits  # [1, T, V]
        ours = model(ids, torch.arange(ids.shape[1])[None])
        err = float((ours - ref).abs().max() / ref.abs().max())
        assert err <= 1e-4, (prompt, err)


@torch.inference_mode()
def test_greedy_48_tokens_match_transformers(smollm2, hf_smollm2):
    from shardserve_server.engine.local import LocalEngine
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    engine = LocalEngine(smollm2.model, smollm2.tokenizer)
    greedy = SamplingParams(temperature=0.0)
    for prompt in PROMPTS[:3]:
        ids = smollm2.tokenizer.encode(prompt)
        ref = hf_smollm2.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        req = GenerationRequest(tuple(ids), greedy, StoppingParams(48, ignore_eos=True))
        ours = engine.generate([req])[0].token_ids
        assert ours == ref, prompt


def _write_gguf(path: Path, arch: str = "llama", tensor_type: str = "F32") -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    tokens = [chr(ord("a") + i) for i in range(16)]
    w.add_token_list(tokens)
    w.add_token_types([1] * 16)
    w.add_token_merges([])
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (16, 8),
        "blk.0.attn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (4, 8),
        "blk.0.attn_v.weight": (4, 8),
        "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_norm.weight": (8,),
        "blk.0.ffn_gate.weight": (16, 8),
        "blk.0.ffn_up.weight": (16, 8),
        "blk.0.ffn_down.weight": (8, 16),
        "output_norm.weight": (8,),
    }
    for name, shape in shapes.items():
        arr = rng.standard_normal(shape).astype(np.float32)
        if tensor_type == "I32" and name == "blk.0.ffn_up.weight":
            w.add_tensor(name, arr.astype(np.int32))
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".out", "out")))


def test_small_gguf_imports(tmp_path):
    src = tmp_path / "m.gguf"
    _write_gguf(src)
    import_model(src, tmp_path / "out")
    assert read_manifest(tmp_path / "out").config["n_kv_heads"] == 1


@pytest.mark.parametrize("case", ["missing", "truncated", "unsupported_type", "unknown_arch"])
def test_bad_gguf_clear_error_and_no_output(tmp_path, case, smollm2_gguf):
    src = tmp_path / "m.gguf"
    if case == "missing":
        match = "no such file"
    elif case == "truncated":
        shutil.copyfile(smollm2_gguf, src)
        with open(src, "r+b") as f:
            f.truncate(src.stat().st_size // 2)
        match = "truncated"
    elif case == "unsupported_type":
        _write_gguf(src, tensor_type="I32")
        match = "type I32"
    else:
        _write_gguf(src, arch="mamba")
        match = "architecture 'mamba'"
    with pytest.raises(CheckpointError, match=match) as err:
        import_model(src, tmp_path / "out")
    assert str(src) in str(err.value)
    assert _leftovers(tmp_path) == []
