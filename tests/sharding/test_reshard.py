"""Streaming, verified resharding: a -> b -> c equals a -> c bitwise, any layout serves at any valid
TP (slice reads, PP > 1 sources too), SmolLM2 survives TP=3 and back, damaged or inconsistent
checkpoints fail naming the file, an interrupted reshard leaves nothing, --verify catches a
consistent tamper, and the CLI reports both outcomes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch_threads import torch_threads
from tp_cases import (
    layouts,
    models,
    random_model,
    rel_err,
    sharded_logits,
    tokens_for,
    tps_of,
    write_model,
)

from shardserve_sharding.checkpoint.io import load_model
from shardserve_sharding.checkpoint.manifest import CheckpointError, read_manifest
from shardserve_sharding.checkpoint.safetensors_stream import sha256_file
from shardserve_sharding.checkpoint.source import ShardserveSource
from shardserve_sharding.models import LlamaConfig
from shardserve_sharding.partition import TPGeometry, check_tp, shard_spec, shard_tensor
from shardserve_sharding.reshard import reshard, verify_reshard
from shardserve_sharding.sharded_load import read_rank_state
from shardserve_sharding.split_table import split_kind

PROPERTY = settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])


def _rank_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    m = read_manifest(directory)
    return {name: load_file(directory / name) for name in m.rank_files().values()}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same layout, same manifest entries, same rank files and tensors, bit for bit."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma.layout == mb.layout and ma.config == mb.config and ma.dtype == mb.dtype
    assert ma.tensors == mb.tensors
    ta, tb = _rank_tensors(a), _rank_tensors(b)
    assert set(ta) == set(tb)
    for fname in ta:
        assert list(ta[fname]) == list(tb[fname]), fname
        for name, t in ta[fname].items():
            assert torch.equal(t, tb[fname][name]), (fname, name)
        # the streaming writer is deterministic: the files themselves are equal
        assert ma.files[fname].sha256 == mb.files[fname].sha256, fname


# ---- properties over random tiny models ----------------------------------------------------


@PROPERTY
@given(data=st.data(), fam_cfg=models)
def test_reshard_a_b_c_equals_a_c_bitwise(data, fam_cfg):
    family, cfg = fam_cfg
    a, b, c = (data.draw(layouts(family, cfg), label=x) for x in "abc")
    model = random_model(family, cfg, seed=data.draw(st.integers(0, 99), label="seed"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = write_model(root / "src", model)
        reshard(src, root / "a", tp=a[0], pp=a[1])
        reshard(root / "a", root / "ab", tp=b[0], pp=b[1])
        reshard(root / "ab", root / "abc", tp=c[0], pp=c[1])
        reshard(root / "a", root / "ac", tp=c[0], pp=c[1])
        _assert_same_checkpoint(root / "abc", root / "ac")
        reshard(root / "abc", root / "back", tp=1)
        _assert_same_checkpoint(root / "back", src)  # and back to the original, bitwise


@PROPERTY
@given(data=st.data(), fam_cfg=models)
def test_any_layout_serves_at_any_tp(data, fam_cfg):
    """Slice reads (read_rank_state / read_local) of layout a at TP=N: bitwise the same slices as
    cutting the global tensor, and logits within 1e-5 of TP=1."""
    family, cfg = fam_cfg
    tp_a, pp_a = data.draw(layouts(family, cfg), label="layout")
    n = data.draw(st.sampled_from(tps_of(family, cfg)), label="serve_tp")
    model = random_model(family, cfg, seed=1)
    params = dict(model.named_parameters())
    geo = TPGeometry.of(family, cfg)
    toks, pos = tokens_for(cfg)
    with torch.no_grad():
        ref = model(toks, pos)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reshard(write_model(root / "src", model), root / "a", tp=tp_a, pp=pp_a)
        source = ShardserveSource(root / "a")
        for name, _ in source.names_and_shapes():
            assert torch.equal(source.tensor(name), params[name].detach())
        for rank in range(n):
            state = read_rank_state(source, n, rank)
            for name, shape in source.names_and_shapes():
                spec = shard_spec(split_kind(family, name), shape, geo, n, rank)
                want = shard_tensor(params[name].detach(), spec)
                assert torch.equal(state[name], want), (name, rank)
        outs = sharded_logits(root / "a", n, toks, pos)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert rel_err(outs[0], ref) <= 1e-5, ((tp_a, pp_a), n, cfg)


# ---- SmolLM2: TP=3 and back ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tp3(smollm2_dir, tmp_path_factory) -> tuple[Path, Path]:
    """SmolLM2 resharded to TP=3, and that back to TP=1 (once per module)."""
    root = tmp_path_factory.mktemp("smol_reshard")
    reshard(smollm2_dir, root / "tp3", tp=3)
    reshard(root / "tp3", root / "tp1", tp=1)
    return root / "tp3", root / "tp1"


@pytest.mark.slow
def test_smollm2_tp3_and_back_is_bitwise_the_import(smol_tp3, smollm2_dir):
    tp3, tp1 = smol_tp3
    m3 = read_manifest(tp3)
    assert m3.layout.tp == 3 and len(m3.rank_files()) == 3
    # tp 3: the 9 query heads give 3 per rank, each of the 3 KV heads goes to one rank
    with safe_open(str(tp3 / "rank-tp01-pp00.safetensors"), framework="pt") as f:
        assert f.get_slice("layers.0.attention.wqkv.weight").get_shape() == [320, 576]
        assert f.get_slice("tok_embeddings.weight").get_shape() == [16384, 576]
    assert (tp1 / "tokenizer" / "tokenizer.json").is_file()
    _assert_same_checkpoint(tp1, smollm2_dir)


@pytest.mark.slow
def test_smollm2_round_trip_generates_the_same_greedy_tokens(smol_tp3, smollm2):
    from shardserve_server.engine.local import LocalEngine
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    loaded = load_model(smol_tp3[1])
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    reqs = [
        GenerationRequest(
            tuple(smollm2.tokenizer.encode(p)),
            SamplingParams(temperature=0.0),
            StoppingParams(20, ignore_eos=True),
        )
        for p in prompts
    ]
    # one thread: decode steps are many small parallel regions, and spinning OpenMP workers
    # slow them down tenfold whenever the cores are shared with other processes
    with torch_threads(1):
        ours = [r.token_ids for r in LocalEngine(loaded.model, loaded.tokenizer).generate(reqs)]
        ref = [r.token_ids for r in LocalEngine(smollm2.model, smollm2.tokenizer).generate(reqs)]
    assert ours == ref and all(len(t) == 20 for t in ours)


@pytest.mark.slow
def test_smollm2_tp3_logits_equal_tp1(smol_tp3, smollm2, smollm2_dir):
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = smollm2.model(ids, pos)
    for directory in (smol_tp3[0], smollm2_dir):  # own rank files; slice reads of TP=1
        outs = sharded_logits(directory, 3, ids, pos)
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert rel_err(outs[0], ref) <= 1e-5, directory


@pytest.mark.slow
def test_smollm2_tp2_is_refused_with_the_valid_tps(smollm2_dir, tmp_path):
    cfg = ShardserveSource(smollm2_dir).config
    with pytest.raises(ValueError) as e:
        check_tp("llama", cfg, 2)
    assert "9 query heads" in str(e.value) and "[1, 3]" in str(e.value)
    with pytest.raises(ValueError, match=r"valid tp values: \[1, 3\]"):
        reshard(smollm2_dir, tmp_path / "tp2", tp=2)
    assert list(tmp_path.iterdir()) == []


# ---- damaged and inconsistent checkpoints --------------------------------------------------

TINY = LlamaConfig(
    vocab_size=263,
    dim=24,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    intermediate_size=24,
    tie_embeddings=True,
    max_seq_len=64,
)
"""Valid TPs [1, 2, 6]; 263 rows pad to 264 at TP=2."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama with a tokenizer: TP=1 source, TP=2 and TP=2 x PP=2 copies, and its model."""
    from shardserve_sharding.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny")
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=262)
    model = random_model("llama", TINY, seed=11)
    write_model(root / "src", model, tokenizer=tok)
    reshard(root / "src", root / "tp2", tp=2)
    reshard(root / "src", root / "tp2pp2", tp=2, pp=2)
    return {"src": root / "src", "tp2": root / "tp2", "tp2pp2": root / "tp2pp2", "model": model}


def _copy(tiny, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny[name], dst)
    return dst


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}")))


def _flip_header(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[12] ^= 0xFF  # inside the JSON header: no longer UTF-8
    b[40] ^= 0xFF
    p.write_bytes(bytes(b))


def _flip_header_len(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[3] ^= 0x40  # the 8-byte header length now claims a gigabyte
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-64])


DAMAGE = {
    "header-bytes": _flip_header,
    "header-length": _flip_header_len,
    "truncated": _truncate,
    "missing": Path.unlink,
}

ACTIONS = {
    # served at its own TP (each rank reads its own file), at TP=1 (slice reads), resharded
    "load-own-tp": lambda d, tmp: sharded_logits(d, 2, *tokens_for(TINY)),
    "load-other-tp": lambda d, tmp: sharded_logits(d, 1, *tokens_for(TINY)),
    "reshard": lambda d, tmp: reshard(d, tmp / "out", tp=1),
}


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_rank_file_is_a_clear_error(tiny, tmp_path, damage, action):
    d = _copy(tiny, "tp2", tmp_path)
    bad = d / "rank-tp01-pp00.safetensors"
    DAMAGE[damage](bad)
    with pytest.raises(CheckpointError) as e:
        ACTIONS[action](d, tmp_path)
    assert str(bad) in str(e.value)
    assert _leftovers(tmp_path, "out") == []


def _edit_manifest(d: Path, fn) -> None:
    j = json.loads((d / "manifest.json").read_text())
    fn(j)
    (d / "manifest.json").write_text(json.dumps(j))


CONFIG_EDITS = {
    "dim": ("dim", 36),
    "intermediate": ("intermediate_size", 48),
    "vocab": ("vocab_size", 264),
    "layers": ("n_layers", 3),
    "untied": ("tie_embeddings", False),
    "heads": ("n_heads", 4),  # head_dim 6 instead of 4: other wqkv shapes
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_manifest_config_that_does_not_fit_the_tensors_is_refused(tiny, tmp_path, edit):
    key, value = CONFIG_EDITS[edit]
    d = _copy(tiny, "tp2pp2", tmp_path)
    _edit_manifest(d, lambda j: j["config"].__setitem__(key, value))
    manifest = str(d / "manifest.json")
    for action in ACTIONS.values():
        with pytest.raises(CheckpointError, match="manifest.json") as e:
            action(d, tmp_path)
        assert manifest in str(e.value)
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_load_model_refuses_a_config_that_does_not_fit(tiny, tmp_path, edit):
    key, value = CONFIG_EDITS[edit]
    d = _copy(tiny, "src", tmp_path)
    _edit_manifest(d, lambda j: j["config"].__setitem__(key, value))
    with pytest.raises(CheckpointError, match=str(d)):
        load_model(d)


def _rewrite_rank_file(d: Path, fname: str, fn) -> None:
    """Rewrite a rank file through `fn(tensors)` and record its new size and sha256, so that the
    checkpoint is consistent on disk (only its numbers are wrong)."""
    path = d / fname
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata=meta)

    def fix(j):
        j["files"][fname]["size"] = path.stat().st_size
        j["files"][fname]["sha256"] = sha256_file(path)

    _edit_manifest(d, fix)


def _drop_w2(t):
    t.pop("layers.1.feed_forward.w2.weight")


def _narrow_w2(t):
    t["layers.1.feed_forward.w2.weight"] = t["layers.1.feed_forward.w2.weight"][:, :10].clone()


@pytest.mark.parametrize("change", [_drop_w2, _narrow_w2], ids=["tensor-missing", "wrong-shape"])
def test_rank_file_that_does_not_fit_its_manifest_names_the_file(tiny, tmp_path, change):
    d = _copy(tiny, "tp2", tmp_path)
    fname = "rank-tp01-pp00.safetensors"
    _rewrite_rank_file(d, fname, change)
    for action in ACTIONS.values():
        with pytest.raises(CheckpointError, match=fname):
            action(d, tmp_path)
    assert _leftovers(tmp_path, "out") == []


def test_verify_catches_a_consistently_tampered_checkpoint(tiny, tmp_path):
    d = _copy(tiny, "tp2", tmp_path)
    fname = "rank-tp01-pp00.safetensors"

    def perturb(t):
        t["layers.1.feed_forward.w2.weight"][0, 0] += 0.05

    _rewrite_rank_file(d, fname, perturb)
    ShardserveSource(d, verify_hashes=True)  # sizes and hashes all agree
    with pytest.raises(CheckpointError, match="verification failed") as e:
        verify_reshard(tiny["src"], d)
    assert str(d) in str(e.value)
    assert verify_reshard(tiny["src"], tiny["tp2"]) <= 1e-5
    assert verify_reshard(tiny["src"], tiny["tp2pp2"]) <= 1e-5


def test_reshard_verify_fails_when_the_written_slices_are_wrong(tiny, tmp_path, monkeypatch):
    original = ShardserveSource.read_rows

    def skewed(self, name, r0, r1, out):
        original(self, name, r0, r1, out)
        if out.dim() == 2:
            out.mul_(1.001)  # every matrix read slightly off

    monkeypatch.setattr(ShardserveSource, "read_rows", skewed)
    with pytest.raises(CheckpointError, match="verification failed"):
        reshard(tiny["src"], tmp_path / "out", tp=2, verify=True)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    rep = reshard(tiny["src"], tmp_path / "good", tp=2, verify=True)
    assert rep.verify_error is not None and rep.verify_error <= 1e-5


@pytest.mark.parametrize("src_name", ["src", "tp2", "tp2pp2"])
@pytest.mark.parametrize("target", [(1, 1), (2, 1), (6, 2)])
def test_chunked_streaming_equals_whole_tensor_cuts(tiny, tmp_path, monkeypatch, src_name,
                                                     target):
    """Rows streamed a few at a time (chunks smaller than one row of most tensors, so every
    dim-0 piece, dim-1 column cut, replicated KV head and vocabulary pad crosses chunk
    borders) give bitwise the slices of cutting the whole tensor, and the same files as
    large chunks."""
    import shardserve_sharding.reshard_write as mod

    tp, pp = target
    reshard(tiny[src_name], tmp_path / "big", tp=tp, pp=pp)
    monkeypatch.setattr(mod, "CHUNK_BYTES", 100)
    reshard(tiny[src_name], tmp_path / "small", tp=tp, pp=pp)
    _assert_same_checkpoint(tmp_path / "big", tmp_path / "small")
    params = dict(tiny["model"].named_parameters())
    geo = TPGeometry.of("llama", TINY)
    for rank in range(tp):
        state = read_rank_state(ShardserveSource(tmp_path / "small"), tp, rank)
        for name, p in params.items():
            spec = shard_spec(split_kind("llama", name), tuple(p.shape), geo, tp, rank)
            assert torch.equal(state[name], shard_tensor(p.detach(), spec)), (name, rank)


def test_bf16_output_from_fp32_streams_converted_rows(tiny, tmp_path):
    reshard(tiny["tp2"], tmp_path / "bf16", tp=1, dtype="bf16")
    src = ShardserveSource(tmp_path / "bf16")
    assert src.dtype == torch.bfloat16
    for name, p in tiny["model"].named_parameters():
        assert torch.equal(src.tensor(name), p.detach().to(torch.bfloat16)), name


def test_flipped_data_byte_fails_the_hash_check(tiny, tmp_path):
    d = _copy(tiny, "tp2", tmp_path)
    bad = d / "rank-tp00-pp00.safetensors"
    b = bytearray(bad.read_bytes())
    b[-3] ^= 0x01  # tensor data, not the header: only the sha256 can tell
    bad.write_bytes(bytes(b))
    ShardserveSource(d, verify_hashes=False)  # sizes agree
    with pytest.raises(CheckpointError, match="sha256") as e:
        ShardserveSource(d)  # the default verifies
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_reshard_leaves_nothing(tiny, tmp_path, monkeypatch, exc):
    original = ShardserveSource.read_rows
    calls = []

    def flaky(self, name, r0, r1, out):
        calls.append(name)
        if len(calls) == 6:
            raise exc("interrupted mid-way")
        return original(self, name, r0, r1, out)

    monkeypatch.setattr(ShardserveSource, "read_rows", flaky)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(exc, match="interrupted mid-way"):
        reshard(tiny["src"], parent / "dst", tp=2, pp=2)
    assert len(calls) == 6
    assert list(parent.iterdir()) == []  # no dst, no hidden temporary directory or file


def test_interrupted_overwrite_keeps_the_old_checkpoint(tiny, tmp_path, monkeypatch):
    dst = _copy(tiny, "tp2", tmp_path)
    before = {p.name: sha256_file(p) for p in dst.iterdir() if p.is_file()}

    def boom(self, name, r0, r1, out):
        raise OSError("disk full")

    monkeypatch.setattr(ShardserveSource, "read_rows", boom)
    with pytest.raises(OSError, match="disk full"):
        reshard(tiny["src"], dst, tp=6, overwrite=True)
    monkeypatch.undo()
    assert {p.name: sha256_file(p) for p in dst.iterdir() if p.is_file()} == before
    assert _leftovers(tmp_path, "ckpt") == ["ckpt"]
    reshard(tiny["src"], dst, tp=6, overwrite=True)  # a completed overwrite replaces it
    assert read_manifest(dst).layout.tp == 6 and _leftovers(tmp_path, "ckpt") == ["ckpt"]


def test_bad_targets_are_refused_before_any_work(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"valid tp values: \[1, 2, 6\]"):
        reshard(tiny["src"], tmp_path / "out", tp=4)
    with pytest.raises(ValueError, match="pp 3 must be between 1 and the number of layers 2"):
        reshard(tiny["src"], tmp_path / "out", tp=2, pp=3)
    with pytest.raises(FileExistsError):
        reshard(tiny["src"], tiny["tp2"], tp=2)
    assert list(tmp_path.iterdir()) == []


# ---- the command line ----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("shardserve")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "shardserve_server.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli_reshard_with_verify(tiny, tmp_path):
    dst = tmp_path / "tp2"
    r = _cli("reshard", str(tiny["src"]), str(dst), "--tp", "2", "--verify", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout
    assert read_manifest(dst).layout.tp == 2 and (dst / "tokenizer").is_dir()
    _assert_same_checkpoint(dst, tiny["tp2"])


@pytest.mark.slow
def test_cli_invalid_tp_exits_2_listing_the_valid_tps(tiny, tmp_path):
    r = _cli("reshard", str(tiny["src"]), str(tmp_path / "out"), "--tp", "4", "--quiet")
    assert r.returncode == 2
    assert "valid tp values: [1, 2, 6]" in r.stderr and "6 query heads" in r.stderr
    assert list(tmp_path.iterdir()) == []
