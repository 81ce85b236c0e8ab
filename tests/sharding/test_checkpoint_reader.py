"""Every checkpoint reader (ours, HF safetensors, GGUF, Megatron-LM, PyTorch DCP) implements the
CheckpointSource protocol itself, and each member answers consistently on a tiny checkpoint of
its format (built the way the format's own tests build one)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from megatron_writer import write_megatron
from test_import_gguf import _write_gguf
from test_import_hf import hf_model, save_hf
from test_megatron_dcp import CORPUS, make_model, state_of, torchtitan_state

from shardserve_sharding.checkpoint.reader import CheckpointSource
from shardserve_sharding.partition import TPGeometry, shard_spec, shard_tensor
from shardserve_sharding.reshard import open_any_source
from shardserve_sharding.split_table import split_kind
from shardserve_sharding.tokenizer import train_bpe

FORMATS = ["shardserve", "hf", "gguf", "megatron", "dcp"]
MEMBERS = sorted({n for n in (*vars(CheckpointSource), *CheckpointSource.__annotations__)
                  if not n.startswith("_")})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir):
    """format -> (path, open_any_source keyword arguments)."""
    root = tmp_path_factory.mktemp("readers")
    tok = train_bpe(CORPUS, vocab_size=300)
    hf = save_hf(hf_model(), root / "hf", tok)
    _write_gguf(root / "m.gguf")
    model = make_model(tok, tied=False)
    mg = write_megatron(root / "mg", state_of(model), model.config, tp=2, pp=2)
    dcp.save(torchtitan_state(model, False, ""), checkpoint_id=str(root / "dcp"), no_dist=True)
    c = model.config
    params = root / "params.json"
    params.write_text(json.dumps({k: getattr(c, k) for k in (
        "dim", "n_layers", "n_heads", "n_kv_heads", "rope_theta", "norm_eps", "max_seq_len")}))
    return {
        "shardserve": (tiny_llama_dir, {}),
        "hf": (hf, {}),
        "gguf": (root / "m.gguf", {}),
        "megatron": (mg, {"tokenizer": tok}),
        "dcp": (root / "dcp", {"tokenizer": tok, "config": params}),
    }


def test_protocol_lists_the_reader_members():
    assert {"family", "config", "quant", "positioned_reads", "dtype", "names_and_shapes",
            "tensor_dtype", "tensor", "read_rows", "read_local", "tokenizer", "source_info",
            "close"} <= set(MEMBERS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_implements_checkpoint_source(checkpoints, fmt):
    path, kw = checkpoints[fmt]
    src = open_any_source(path, fmt, **kw)
    assert isinstance(src, CheckpointSource)
    mro = type(src).__mro__
    own = mro[: mro.index(CheckpointSource)]  # the reader's classes, above the protocol
    for member in MEMBERS:  # implemented by the reader, not left to the protocol's stubs
        assert member in vars(src) or any(member in vars(k) for k in own), member
    assert src.family == "llama" and src.config.vocab_size > 0
    assert src.quant is None and isinstance(src.positioned_reads, bool)
    assert src.dtype == torch.float32
    names = src.names_and_shapes()
    assert names and all(isinstance(n, str) and isinstance(s, tuple) for n, s in names)
    geo = TPGeometry.of(src.family, src.config)
    for name, shape in names:
        full = src.tensor(name)
        assert tuple(full.shape) == shape and full.dtype == src.tensor_dtype(name), name
        rows = torch.empty((2, *shape[1:]), dtype=src.tensor_dtype(name))  # [2, *inner]
        src.read_rows(name, 1, 3, rows)
        assert torch.equal(rows, full[1:3]), name
        spec = shard_spec(split_kind(src.family, name), shape, geo, 2, 1)
        assert torch.equal(src.read_local(name, spec), shard_tensor(full, spec)), name
    tok = src.tokenizer()  # every one of these tiny checkpoints has (or was given) one
    assert tok is not None and tok.vocab_size <= src.config.vocab_size
    assert src.source_info()["format"] == fmt
    src.close()
