"""A quantized checkpoint through the serving paths: `shardserve reshard --quantize` on the
command line, then `shardserve generate` with the local engine (TP=1) and with a real TP=2
worker group (gloo, paged KV cache): the same greedy tokens, and the int8 kernels in use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from grpc_servers import generate_tp1_and_tp2

from shardserve_sharding.checkpoint.io import load_model
from shardserve_sharding.checkpoint.manifest import read_manifest
from shardserve_sharding.quant.kernels import Int8Weight

EXE = Path(sys.executable).with_name("shardserve")


def test_cli_quantized_generate_tp2_equals_tp1(tiny_llama_dir, tmp_path):
    dst = tmp_path / "int8"
    done = subprocess.run([str(EXE), "reshard", str(tiny_llama_dir), str(dst), "--tp", "1",
                           "--quantize", "int8", "--group-size", "0", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    # per-row int8: the tiny model's w2 has 96 input columns, 3 groups of 32, which TP=2
    # cannot cut (the default g32 is served at TP=3 in tests/sharding/test_quant.py)
    assert done.returncode == 0, done.stderr
    assert read_manifest(dst).quantization["scheme"] == "int8"
    assert read_manifest(dst).quantization["group_size"] == 0
    loaded = load_model(dst)
    assert loaded.model.layers[0].attention.wqkv.weight is None
    assert isinstance(loaded.model.layers[0].attention.wqkv.qweight, Int8Weight)
    assert loaded.model.output.qweight is loaded.model.tok_embeddings.qweight  # tied, one copy
    assert loaded.model.tok_embeddings.qweight.q.dtype == torch.int8
    plain, tp2 = generate_tp1_and_tp2(dst)
    assert len(plain["token_ids"]) == 8
    for key in ("token_ids", "text", "finish_reason", "prompt_tokens"):
        assert tp2[key] == plain[key], key
