"""The checkpoint format: write/read round trips, what manifest.json records, damaged checkpoints
fail with the file's name, interrupted or refused writes leave nothing, and the streaming
safetensors writer produces files safetensors itself reads back bitwise."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from shardserve_sharding.checkpoint.io import load_model, write_checkpoint
from shardserve_sharding.checkpoint.manifest import CheckpointError, read_manifest
from shardserve_sharding.checkpoint.safetensors_stream import (
    SafetensorsStreamWriter,
    TensorSpec,
)
from shardserve_sharding.models import build_model, checkpoint_names
from shardserve_sharding.models.convlm import ConvLMConfig
from shardserve_sharding.models.llama import LlamaConfig
from shardserve_sharding.split_table import split_kind
from shardserve_sharding.tokenizer import train_bpe

RANK0 = "rank-tp00-pp00.safetensors"
VOCAB = 280


def make_config(family: str, tied: bool):
    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                           n_kv_heads=1 if tied else 2, intermediate_size=48,
                           rope_theta=10000.0 if tied else 500000.0, tie_embeddings=tied,
                           max_seq_len=64)
    return ConvLMConfig(vocab_size=VOCAB, dim=24, hidden=40, n_layers=2, kernel_size=3,
                        tie_embeddings=tied, max_seq_len=64)


def make_model(family: str, tied: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(family, make_config(family, tied)).eval()
    with torch.no_grad():  # norms away from 1 and a non-zero conv bias: every tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "conv.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def write(dst: Path, model, *, dtype=torch.float32, tokenizer=None, tensors=None, **kw) -> Path:
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    specs = [TensorSpec(n, dtype, tuple(params[n].shape)) for n in names]
    if tensors is None:
        tensors = ((n, params[n].detach()) for n in names)
    return write_checkpoint(dst, family=model.family, config=model.config.to_dict(),
                            tensors=tensors, specs=specs, tokenizer=tokenizer, dtype=dtype, **kw)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the cat sat on the mat; the dog sat on the log. 0123456789"] * 10,
                     vocab_size=VOCAB)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    """An untied tiny Llama checkpoint with a tokenizer; tests damage copies of it."""
    return write(tmp_path_factory.mktemp("ckpt") / "llama", make_model("llama", False),
                 tokenizer=tokenizer)


@pytest.fixture
def copy(ckpt, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", ["llama", "convlm"])
def test_round_trip_gives_identical_weights_and_logits(tmp_path, tokenizer, family, tied, dtype):
    model = make_model(family, tied, seed=3)
    write(tmp_path / "ck", model, dtype=dtype, tokenizer=tokenizer)
    loaded = load_model(tmp_path / "ck", dtype=dtype, verify_hashes=True)
    got = loaded.model
    assert type(got) is type(model) and got.config == model.config
    ref_state = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
    got_state = dict(got.named_parameters())
    assert sorted(got_state) == sorted(ref_state)
    for n, p in got_state.items():
        assert p.dtype == dtype and torch.equal(p, ref_state[n]), n
    assert (got.output.weight is got.tok_embeddings.weight) is tied
    assert ("output.weight" in loaded.manifest.tensors) is not tied
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = logits(model.to(dtype), tokens)
    out = logits(got, tokens)
    assert out.dtype == dtype and torch.equal(out, ref)
    text = "the dog sat on 42 mats"
    assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded.tokenizer.eos_token_ids == tokenizer.eos_token_ids


def test_bf16_checkpoint_loads_as_fp32_exactly(tmp_path):
    model = make_model("llama", True)
    write(tmp_path / "ck", model, dtype=torch.bfloat16)
    got = load_model(tmp_path / "ck", dtype=torch.float32)
    assert got.tokenizer is None and got.manifest.tokenizer is None
    for n, p in got.model.named_parameters():
        ref = dict(model.named_parameters())[n].detach().to(torch.bfloat16).float()
        assert p.dtype == torch.float32 and torch.equal(p, ref), n


# --- the manifest --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "convlm"])
def test_manifest_records_shapes_dtype_splits_sizes_and_hashes(tmp_path, tokenizer, family):
    model = make_model(family, tied=False)
    dst = write(tmp_path / "ck", model, dtype=torch.bfloat16, tokenizer=tokenizer,
                source={"format": "test", "seed": 0})
    m = read_manifest(dst)
    raw = json.loads((dst / "manifest.json").read_text())
    assert raw["format"] == "shardserve-checkpoint" and raw["format_version"] == 1
    assert m.family == family and m.dtype == "bfloat16" and m.config == model.config.to_dict()
    assert (m.layout.tp, m.layout.pp) == (1, 1)
    assert m.source == {"format": "test", "seed": 0} and m.tokenizer == "tokenizer"
    params = dict(model.named_parameters())
    assert list(m.tensors) == checkpoint_names(model)
    for name, e in m.tensors.items():
        assert e.shape == tuple(params[name].shape), name
        assert e.dtype == "bfloat16" and e.pp_rank == 0
        assert e.split == split_kind(family, name).value, name
    assert m.rank_files() == {(0, 0): RANK0}
    # every file on disk is listed (nothing stray, no temporaries), with its size and sha256
    on_disk = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()}
    assert on_disk == set(m.files) | {"manifest.json"}
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(m.files)
    for name, f in m.files.items():
        data = (dst / name).read_bytes()
        assert f.size == len(data), name
        assert f.sha256 == hashlib.sha256(data).hexdigest(), name
    # the rank file holds exactly the manifest's tensors, at its shapes and dtype
    with safe_open(str(dst / RANK0), framework="pt") as f:
        assert sorted(f.keys()) == sorted(m.tensors)
        assert f.metadata()["tp_rank"] == "0" and f.metadata()["pp_rank"] == "0"
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == m.tensors[name].shape


# --- damaged checkpoints -------------------------------------------------------------------


def _error(directory: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(directory, **kw)
    return str(err.value)


def test_missing_rank_file_names_it(copy):
    (copy / RANK0).unlink()
    msg = _error(copy)
    assert str(copy / RANK0) in msg and "missing" in msg


def test_truncated_rank_file_fails_the_size_check(copy):
    path = copy / RANK0
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)
    msg = _error(copy)
    assert str(path) in msg and "size" in msg and "truncated" in msg


@pytest.mark.parametrize("name", [RANK0, "tokenizer/tokenizer.json"])
def test_flipped_byte_fails_the_hash_check(copy, name):
    path = copy / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the same size: only the sha256 can tell
    path.write_bytes(bytes(data))
    msg = _error(copy, verify_hashes=True)
    assert str(path) in msg and "sha256" in msg


def test_hashes_are_checked_by_default_and_skipped_on_request(copy):
    path = copy / RANK0
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # a bit of the last weight
    path.write_bytes(bytes(data))
    msg = _error(copy)  # the default verifies sha256
    assert str(path) in msg and "sha256" in msg
    load_model(copy, verify_hashes=False)  # --no-verify: presence and size only


def test_verified_files_are_remembered_until_they_change(copy, monkeypatch, tmp_path):
    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.checkpoint.verify import STAMP, verify_checkpoint

    m = read_manifest(copy)
    total = sum(f.size for f in m.files.values())
    first = verify_checkpoint(copy, m)
    assert first.hashed_bytes == total and (copy / STAMP).is_file()
    again = verify_checkpoint(copy, m)
    assert again.hashed_bytes == 0 and again.remembered == len(m.files)
    # a rewrite (new mtime / inode) is hashed again, and a flipped byte found
    path = copy / RANK0
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(copy, m)
    # a damaged stamp only costs a re-hash
    (copy / STAMP).write_text("[not json")
    path.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 0x40])))
    assert verify_checkpoint(copy, m).hashed_bytes == total


def test_read_only_checkpoint_keeps_its_stamp_in_the_cache(copy, monkeypatch, tmp_path):
    import os

    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.checkpoint.verify import STAMP, verify_checkpoint

    if os.geteuid() == 0:  # root writes through mode bits: make the stamp path unwritable
        (copy / STAMP).mkdir()
    else:
        copy.chmod(0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = read_manifest(copy)
    assert verify_checkpoint(copy, m).hashed_bytes > 0
    assert list((tmp_path / "cache" / "shardserve" / "verified").glob("*.json"))
    assert verify_checkpoint(copy, m).hashed_bytes == 0
    copy.chmod(0o755)


def test_symlinked_file_leaving_the_directory_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (copy / RANK0).rename(outside)
    (copy / RANK0).symlink_to(outside)
    assert "outside the checkpoint" in _error(copy)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_text('{"format": "shardserve-checkpoint", '), "not valid JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
        (lambda p: p.unlink(), "missing"),
        (lambda p: _edit(p, lambda d: d.pop("tensors")), "malformed"),
        (lambda p: p.write_text("[1, 2]"), "a JSON object is expected"),
        (lambda p: p.write_text('"text"'), "a JSON object is expected"),
        (lambda p: _edit(p, lambda d: next(iter(d["tensors"].values())).update(dtype="f99")),
         "'f99' is not one of"),
        (lambda p: _edit(p, lambda d: d.update(dtype="int3")), "'int3' is not one of"),
        (lambda p: _edit(p, lambda d: next(iter(d["tensors"].values())).update(split="diag")),
         "split 'diag'"),
        (lambda p: _edit(p, lambda d: d["files"].update({"../x": next(iter(
            d["files"].values()))})), "leaves the checkpoint directory"),
        (lambda p: _edit(p, lambda d: d["files"].update({"/etc/passwd": next(iter(
            d["files"].values()))})), "leaves the checkpoint directory"),
        (lambda p: _edit(p, lambda d: d.update(tokenizer="../../tok")),
         "leaves the checkpoint directory"),
        (lambda p: _edit(p, lambda d: d.update(layout=[1, 1])), "layout has type list"),
        (lambda p: _edit(p, lambda d: d["tensors"].update(x="y")), "is not an object"),
        (lambda p: _edit(p, lambda d: next(iter(d["files"].values())).update(size="9")),
         "size must be an integer"),
        (lambda p: _edit(p, lambda d: d.update(format_version=99)), "format_version"),
        (lambda p: _edit(p, lambda d: d.update(format="other")), "format"),
    ],
    ids=["truncated-json", "binary", "missing", "no-tensors", "list", "string", "tensor-dtype",
         "dtype", "split", "dotdot-file", "absolute-file", "dotdot-tokenizer", "layout-type",
         "tensor-entry", "size-type", "version", "format"],
)
def test_corrupt_manifest_names_it(copy, damage, words):
    damage(copy / "manifest.json")
    msg = _error(copy)
    assert str(copy / "manifest.json") in msg and words in msg


def _edit(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "change",
    [
        {"dim": 48},  # every shape changes
        {"vocab_size": VOCAB + 1},  # the embedding and output rows
        {"n_layers": 3},  # a layer's weights are missing
        {"n_layers": 1},  # a layer's weights are unexpected
        {"tie_embeddings": True},  # output.weight is unexpected
        {"n_kv_heads": 4},  # wqkv rows
        {"intermediate_size": 40},  # w13 / w2
        {"no_such_key": 1},  # not a config field at all
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_config_that_does_not_fit_the_weights_names_the_manifest(copy, change):
    _edit(copy / "manifest.json", lambda d: d["config"].update(change))
    msg = _error(copy)
    assert str(copy / "manifest.json") in msg


def test_tensor_shape_in_rank_file_differs_from_manifest(copy):
    def edit(d):
        d["tensors"]["norm.weight"]["shape"] = [31]

    _edit(copy / "manifest.json", edit)
    msg = _error(copy)
    assert str(copy / RANK0) in msg and "norm.weight" in msg


# --- atomic writes -------------------------------------------------------------------------


def _entries(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


@pytest.mark.parametrize("stop_at", [0, 5])
def test_interrupted_write_leaves_nothing(tmp_path, tokenizer, stop_at):
    model = make_model("llama", True)
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    (tmp_path / "other").mkdir()
    before = _entries(tmp_path)

    def tensors():
        for i, n in enumerate(names):
            if i == stop_at:
                raise RuntimeError("interrupted")
            yield n, params[n].detach()

    with pytest.raises(RuntimeError, match="interrupted"):
        write(tmp_path / "out", model, tokenizer=tokenizer, tensors=tensors())
    assert _entries(tmp_path) == before  # no out/, no .out.*.partial, no *.tmp


def test_wrong_tensor_from_the_generator_leaves_nothing(tmp_path):
    model = make_model("convlm", False)
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    bad = ((n, params[n].detach()[:1] if i == 3 else params[n].detach())
           for i, n in enumerate(names))
    with pytest.raises(ValueError, match=names[3]):
        write(tmp_path / "out", model, tensors=bad)
    assert _entries(tmp_path) == []


def test_existing_directory_is_refused_without_overwrite(tmp_path, ckpt):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(dst)):
        write(dst, make_model("llama", True))
    assert _entries(dst) == ["keep.txt"] and _entries(tmp_path) == ["dst"]


def test_overwrite_replaces_atomically_and_failed_overwrite_keeps_the_old(tmp_path):
    dst = tmp_path / "dst"
    first, second = make_model("llama", True, seed=1), make_model("llama", True, seed=2)
    write(dst, first)
    names = checkpoint_names(second)
    params = dict(second.named_parameters())

    def failing():
        yield names[0], params[names[0]].detach()
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write(dst, second, tensors=failing(), overwrite=True)
    assert _entries(tmp_path) == ["dst"]
    emb = load_model(dst).model.tok_embeddings.weight
    assert torch.equal(emb, first.tok_embeddings.weight)  # still the first checkpoint
    write(dst, second, overwrite=True)
    assert _entries(tmp_path) == ["dst"]
    emb = load_model(dst, verify_hashes=True).model.tok_embeddings.weight
    assert torch.equal(emb, second.tok_embeddings.weight)


# --- the streaming safetensors writer -----------------------------------------------------


def _bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _stream(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> tuple[str, int]:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = SafetensorsStreamWriter(path, specs, metadata=metadata)
    for n, t in tensors.items():
        w.write(n, t)
    return w.close(), w.size


def test_stream_writer_output_is_what_safetensors_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(5, 7, generator=g)
    f32[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    tensors = {
        "b.bf16": torch.randn(3, 4, 5, generator=g).to(torch.bfloat16),
        "a.f32": f32,
        "f16": torch.randn(9, generator=g).half(),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "i32": torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 128, (3,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "odd": torch.randn(1, 3, generator=g).to(torch.bfloat16),  # 6 bytes: unaligned end
    }
    path = tmp_path / "x.safetensors"
    digest, size = _stream(path, tensors, metadata={"format": "pt", "k": "v"})
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert _entries(tmp_path) == ["x.safetensors"]  # the .tmp was renamed
    (header_len,) = struct.unpack("<Q", data[:8])
    assert header_len % 8 == 0  # the data section starts aligned
    got = load_file(str(path))
    assert set(got) == set(tensors)
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape, n
        assert _bits(got[n]) == _bits(t), n
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64]),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_stream_writer_round_trips_any_shapes(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("st") / "h.safetensors"
    g = torch.Generator().manual_seed(len(items))
    tensors = {
        f"t{i}": (torch.randn(shape, generator=g) * 100).to(dtype)
        for i, (dtype, shape) in enumerate(items)
    }
    digest, size = _stream(path, tensors)
    got = load_file(str(path))
    assert set(got) == set(tensors) and size == path.stat().st_size
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape and _bits(got[n]) == _bits(t)


def test_stream_writer_rejects_out_of_order_and_unfinished_files(tmp_path):
    a, b = torch.ones(2), torch.zeros(3, dtype=torch.bfloat16)
    specs = [TensorSpec("a", a.dtype, (2,)), TensorSpec("b", b.dtype, (3,))]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        w.write("b", b)
    with pytest.raises(ValueError, match="expected a"):
        w.write("a", a.double())  # wrong dtype
    w.write("a", a)
    with pytest.raises(ValueError, match="never written"):
        w.close()
    assert _entries(tmp_path) == []  # neither the file nor its .tmp
    with pytest.raises(ValueError, match="not supported"):
        SafetensorsStreamWriter(tmp_path / "y.st", [TensorSpec("c", torch.complex64, (1,))])
    assert _entries(tmp_path) == []


def test_appended_views_empty_and_strided_chunks_equal_the_tensor(tmp_path):
    g = torch.Generator().manual_seed(2)
    full = torch.randn(7, 5, generator=g).to(torch.bfloat16)
    chunks = [full[:2], full[2:2], full[2:].t().contiguous().t()]  # views, empty, strided
    specs = [TensorSpec("w", torch.bfloat16, (7, 5)), TensorSpec("v", torch.float32, (3,))]
    w = SafetensorsStreamWriter(tmp_path / "p.safetensors", specs)
    w.begin("w", torch.bfloat16)
    for c in chunks:
        w.append(c)
    w.begin("v", torch.float32)
    w.append(torch.ones(1))
    w.append(torch.zeros(2))
    digest = w.close()
    got = load_file(str(tmp_path / "p.safetensors"))
    assert _bits(got["w"]) == _bits(full) and torch.equal(got["v"], torch.tensor([1.0, 0, 0]))
    assert digest == hashlib.sha256((tmp_path / "p.safetensors").read_bytes()).hexdigest()


def test_streamed_tensor_in_chunks_equals_a_whole_write(tmp_path):
    """begin/append (the resharder's path, hashed on a thread) writes the same bytes and sha256
    as write(); overflowing, mixing and unfinished tensors are refused and leave no file."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(40, 9, generator=g)
    small = torch.randn(5, generator=g).to(torch.bfloat16)
    specs = [TensorSpec("big", big.dtype, (40, 9)), TensorSpec("small", small.dtype, (5,))]
    whole, _ = _stream(tmp_path / "whole.safetensors", {"big": big, "small": small})
    w = SafetensorsStreamWriter(tmp_path / "chunks.safetensors", specs)
    w.begin("big", torch.float32)
    for r0 in range(0, 40, 7):  # uneven chunks; the last one shorter
        w.append(big[r0 : r0 + 7].clone(), owned=True)
    w.write("small", small)
    assert w.close() == whole
    assert (tmp_path / "chunks.safetensors").read_bytes() == (
        tmp_path / "whole.safetensors").read_bytes()

    w = SafetensorsStreamWriter(tmp_path / "bad.safetensors", specs)
    w.begin("big", torch.float32)
    with pytest.raises(ValueError, match="overflows"):
        w.append(torch.zeros(41, 9))
    with pytest.raises(ValueError, match="big is torch.float32"):
        w.append(torch.zeros(1, 9, dtype=torch.float64))
    w.append(torch.zeros(39, 9))
    with pytest.raises(ValueError, match="big is not finished"):
        w.begin("small", torch.bfloat16)
    with pytest.raises(ValueError, match="unfinished"):
        w.close()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("bad")]


def test_raw_reader_reads_row_ranges_and_names_a_damaged_file(tmp_path):
    from shardserve_sharding.checkpoint.raw_safetensors import RawSafetensors

    g = torch.Generator().manual_seed(4)
    t = torch.randn(11, 3, generator=g).to(torch.bfloat16)
    path = tmp_path / "r.safetensors"
    _stream(path, {"x": torch.ones(2), "t": t})
    with RawSafetensors(path) as raw:
        out = torch.empty(4, 3, dtype=torch.bfloat16)
        raw.read_rows("t", 5, 9, out)
        assert torch.equal(out, t[5:9])
        with pytest.raises(CheckpointError, match="rows"):
            raw.read_rows("t", 9, 12, torch.empty(3, 3, dtype=torch.bfloat16))
        with pytest.raises(CheckpointError, match="no tensor nope"):
            raw.entry("nope")
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=f"{path}: t occupies bytes"):
        RawSafetensors(path)
