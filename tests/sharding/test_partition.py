"""The split table and its geometry: every kind splits and merges back bitwise, the slices tile
the tensor, KV heads replicate when TP exceeds them, and bad TPs name the numbers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tp_cases import MAX_TP, models, tps_of

from shardserve_sharding.models import LLAMA_CONFIGS, ConvLMConfig, LlamaConfig, expected_tensors
from shardserve_sharding.partition import (
    ShardSpec,
    TPGeometry,
    check_tp,
    kv_heads_per_rank,
    local_shape,
    merge_shards,
    padded_vocab,
    shard_spec,
    shard_tensor,
    stage_layers,
    tensor_stage,
    valid_tps,
)
from shardserve_sharding.split_table import SplitKind, split_kind

FAST = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def _specs(kind, shape, geo, tp):
    return [shard_spec(kind, shape, geo, tp, r) for r in range(tp)]


def _roundtrip(t: torch.Tensor, specs: list[ShardSpec]) -> list[torch.Tensor]:
    shards = [shard_tensor(t, s) for s in specs]
    for s, local in zip(specs, shards, strict=True):
        assert tuple(local.shape) == local_shape(tuple(t.shape), s)
        assert local.is_contiguous()
        if s.pad:  # vocabulary padding is zero rows at the end
            assert not local.narrow(s.dim, s.local_len - s.pad, s.pad).any()
    merged = merge_shards(shards, specs, tuple(t.shape))
    assert merged.dtype == t.dtype and torch.equal(merged, t)
    return shards


def _coverage(specs: list[ShardSpec], n: int) -> list[int]:
    """How many ranks hold each index along the cut dimension."""
    count = [0] * n
    for s in specs:
        for a, b in s.pieces:
            for i in range(a, b):
                count[i] += 1
    return count


@FAST
@given(data=st.data(), fam_cfg=models)
def test_split_then_merge_is_identity_for_every_tensor(data, fam_cfg):
    family, cfg = fam_cfg
    tp = data.draw(st.sampled_from(tps_of(family, cfg)), label="tp")
    geo = TPGeometry.of(family, cfg)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    for name, shape in expected_tensors(family, cfg):
        kind = split_kind(family, name)
        specs = _specs(kind, shape, geo, tp)
        # every rank's local tensor has the same shape (all_gather and the layers need it)
        assert len({local_shape(shape, s) for s in specs}) == 1, name
        t = torch.randn(shape, generator=gen)
        shards = _roundtrip(t, specs)
        if specs[0].dim < 0:
            assert all(torch.equal(s, t) for s in shards)
            continue
        cover = _coverage(specs, shape[specs[0].dim])
        if kind is SplitKind.FUSED_QKV and tp > cfg.n_kv_heads:
            h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
            assert cover == [1] * (h * d) + [tp // hkv] * (2 * hkv * d), name
        else:
            assert cover == [1] * shape[specs[0].dim], name  # an exact tiling


@FAST
@given(
    kind=st.sampled_from(
        [SplitKind.COLWISE, SplitKind.ROWWISE, SplitKind.VOCAB, SplitKind.FUSED_HALVES]
    ),
    tp=st.integers(1, 7),
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    extra=st.lists(st.integers(1, 3), max_size=1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
)
def test_plain_kinds_split_and_merge_bitwise(kind, tp, rows, cols, extra, dtype):
    # sizes are chosen divisible where the kind needs it; the vocabulary is not
    if kind is SplitKind.COLWISE:
        rows *= tp
    elif kind is SplitKind.ROWWISE:
        cols *= tp
    elif kind is SplitKind.FUSED_HALVES:
        rows *= 2 * tp
    shape = (rows, cols, *extra)
    t = (torch.arange(torch.Size(shape).numel()) * 7 % 1001).reshape(shape).to(dtype)
    specs = _specs(kind, shape, TPGeometry(vocab_size=rows), tp)
    _roundtrip(t, specs)
    if kind is SplitKind.VOCAB:
        assert sum(s.local_len for s in specs) == padded_vocab(rows, tp)
        assert sum(s.pad for s in specs) == padded_vocab(rows, tp) - rows


def test_fused_qkv_geometry_of_the_docstring():
    geo = TPGeometry(n_heads=9, n_kv_heads=3, head_dim=4)
    shape = ((9 + 2 * 3) * 4, 8)
    d = 4
    s = shard_spec(SplitKind.FUSED_QKV, shape, geo, 3, 1)
    q, k, v = (3 * d, 6 * d), (9 * d + d, 9 * d + 2 * d), (12 * d + d, 12 * d + 2 * d)
    assert s == ShardSpec(0, (q, k, v))
    # tp=9 > 3 KV heads: ranks 3, 4, 5 share KV head 1; each rank holds one query head
    for r in range(9):
        s = shard_spec(SplitKind.FUSED_QKV, shape, geo, 9, r)
        kv = r // 3
        assert s.pieces == (
            (r * d, (r + 1) * d),
            (36 + kv * d, 36 + (kv + 1) * d),
            (48 + kv * d, 48 + (kv + 1) * d),
        )
    assert kv_heads_per_rank(3, 9) == 1 and kv_heads_per_rank(4, 2) == 2
    with pytest.raises(ValueError, match="neither a divisor nor a multiple of KV heads 3"):
        shard_spec(
            SplitKind.FUSED_QKV,
            (12 * 4 + 2 * 3 * 4, 8),
            TPGeometry(n_heads=12, n_kv_heads=3, head_dim=4),
            4,
            0,
        )
    with pytest.raises(ValueError, match="expected"):
        shard_spec(SplitKind.FUSED_QKV, (61, 8), geo, 3, 0)


def test_vocab_padding_gives_whole_padding_ranks():
    # 5 rows at tp=4: 2 per rank; rank 2 holds row 4 plus one zero row, rank 3 only padding
    specs = _specs(SplitKind.VOCAB, (5, 3), TPGeometry(vocab_size=5), 4)
    assert [s.pieces for s in specs] == [((0, 2),), ((2, 4),), ((4, 5),), ()]
    assert [s.pad for s in specs] == [0, 0, 1, 2]
    _roundtrip(torch.randn(5, 3), specs)


def test_rank_out_of_range_and_uneven_splits_are_errors():
    geo = TPGeometry()
    with pytest.raises(ValueError, match="rank 2 out of range for tp 2"):
        shard_spec(SplitKind.COLWISE, (4, 4), geo, 2, 2)
    with pytest.raises(ValueError, match="output features 5 is not divisible by tp 2"):
        shard_spec(SplitKind.COLWISE, (5, 4), geo, 2, 0)
    with pytest.raises(ValueError, match="input features 3 is not divisible by tp 2"):
        shard_spec(SplitKind.ROWWISE, (4, 3), geo, 2, 0)
    with pytest.raises(ValueError, match="each fused half 3 is not divisible by tp 2"):
        shard_spec(SplitKind.FUSED_HALVES, (6, 4), geo, 2, 0)


@settings(deadline=None, max_examples=20)
@given(fam_cfg=models)
def test_valid_tps_are_exactly_the_tps_that_cut_every_tensor(fam_cfg):
    family, cfg = fam_cfg
    valid = valid_tps(family, cfg, limit=8)
    assert valid[0] == 1
    geo = TPGeometry.of(family, cfg)
    tensors = expected_tensors(family, cfg)
    for tp in range(1, 9):
        try:
            for name, shape in tensors:
                for r in range(tp):
                    shard_spec(split_kind(family, name), shape, geo, tp, r)
            ok = True
        except ValueError:
            ok = False
        assert ok == (tp in valid), tp
        if ok:
            check_tp(family, cfg, tp)
        else:
            with pytest.raises(ValueError, match=r"valid tp values: \[1"):
                check_tp(family, cfg, tp)
    if family == "llama":  # the KV rule: a divisor of the KV heads, or a multiple of them
        for tp in valid:
            assert cfg.n_heads % tp == 0 and cfg.intermediate_size % tp == 0
            assert cfg.n_kv_heads % tp == 0 or tp % cfg.n_kv_heads == 0


def test_smollm2_tp2_names_the_heads_and_the_valid_tps():
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    with pytest.raises(ValueError) as e:
        check_tp("llama", cfg, 2)
    msg = str(e.value)
    assert "9 query heads" in msg and "valid tp values: [1, 3]" in msg
    assert valid_tps("llama", cfg) == [1, 3]
    check_tp("llama", cfg, 3)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        check_tp("llama", cfg, 0)


def test_kv_heads_fewer_than_tp_are_valid_when_tp_is_a_multiple():
    cfg = LlamaConfig(
        vocab_size=11, dim=24, n_layers=1, n_heads=6, n_kv_heads=2, intermediate_size=12
    )
    assert valid_tps("llama", cfg, limit=MAX_TP) == [1, 2, 6]
    conv = ConvLMConfig(11, dim=5, hidden=6, n_layers=2, kernel_size=3)
    assert valid_tps("convlm", conv, limit=8) == [1, 2, 3, 6]  # dim is never cut


def test_split_table_covers_every_parameter_and_rejects_unknown_names():
    for family, cfg in [
        ("llama", LLAMA_CONFIGS["tiny-untied"]),
        ("convlm", ConvLMConfig(11, 4, 4, 2, 3, tie_embeddings=False)),
    ]:
        for name, _ in expected_tensors(family, cfg):
            assert isinstance(split_kind(family, name), SplitKind)
    assert split_kind("llama", "layers.12.attention.wqkv.weight") is SplitKind.FUSED_QKV
    assert split_kind("convlm", "layers.3.conv.bias") is SplitKind.FUSED_HALVES
    with pytest.raises(ValueError, match="no entry in the split table"):
        split_kind("llama", "layers.0.attention.wq.weight")
    with pytest.raises(ValueError, match="no entry in the split table"):
        split_kind("llama", "xlayers.0.attention.wqkv.weight")  # full match only
    with pytest.raises(ValueError, match="unknown model family"):
        split_kind("gpt", "tok_embeddings.weight")


@settings(deadline=None, max_examples=60)
@given(n_layers=st.integers(1, 12), data=st.data())
def test_stages_are_contiguous_and_balanced(n_layers, data):
    pp = data.draw(st.integers(1, n_layers))
    stages = stage_layers(n_layers, pp)
    assert [i for r in stages for i in r] == list(range(n_layers))
    sizes = [len(r) for r in stages]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    for s, r in enumerate(stages):
        for layer in r:
            assert tensor_stage(f"layers.{layer}.ffn_norm.weight", n_layers, pp) == s
    assert tensor_stage("tok_embeddings.weight", n_layers, pp) == 0
    assert tensor_stage("norm.weight", n_layers, pp) == pp - 1
    assert tensor_stage("output.weight", n_layers, pp) == pp - 1


def test_bad_pp_is_an_error():
    with pytest.raises(ValueError, match="pp 3 must be between 1 and the number of layers 2"):
        stage_layers(2, 3)
    with pytest.raises(ValueError, match="pp 0"):
        stage_layers(2, 0)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        tensor_stage("layers.5.norm.weight", 4, 2)
