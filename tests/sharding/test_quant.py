"""Weight-only int8 / int4: the schemes' bounds and packing, quantize-then-shard equals
shard-then-quantize byte for byte at every split kind, `reshard --quantize` and resharding a
quantized checkpoint, the kernels against their dequantized weights, a quantized TP=3
checkpoint generating the same greedy tokens as TP=1, and damaged quantized checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tp_cases import random_model, rel_err, write_model

from shardserve_sharding.checkpoint.manifest import CheckpointError, read_manifest
from shardserve_sharding.models import LlamaConfig, amx_gemm, cpu_gemm, expected_tensors
from shardserve_sharding.models.llama import Linear
from shardserve_sharding.partition import TPGeometry, shard_spec, shard_tensor
from shardserve_sharding.quant import cpu_kernel, kernels
from shardserve_sharding.quant.apply import quantize_state
from shardserve_sharding.quant.kernels import (
    DENSE_MIN_ROWS,
    KERNEL_MAX_ROWS,
    Int4Weight,
    Int8Weight,
)
from shardserve_sharding.quant.scheme import (
    QuantConfig,
    dequantize_int4,
    dequantize_int8,
    int8_clip_errors,
    int8_row_scale,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    unpack_int4,
)
from shardserve_sharding.reshard import reshard
from shardserve_sharding.sharded_load import load_sharded_model
from shardserve_sharding.split_table import SplitKind, split_kind
from shardserve_sharding.tp.comm import ThreadGroup, run_ranks

PROPERTY = settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
CFG = LlamaConfig(vocab_size=41, dim=192, n_layers=2, n_heads=6, n_kv_heads=3,
                  intermediate_size=192, rope_theta=10000.0, tie_embeddings=True, max_seq_len=64)
"""TP 1, 3 and 6 cut it with whole int4 groups of 32 (wo: 192 / 6 = 32 columns per rank; w2
likewise), TP 3 with groups of 64; an odd vocabulary (41) pads at TP 3 and 6; TP 6 replicates
the 3 KV heads."""
SCHEMES = [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64),
           QuantConfig("int8", 32, "int8-g32")]
"""int8 per row (per channel), int4 g32 / g64, and `reshard --quantize int8`'s default: int8
g32 with the embedding int8 g32 too."""


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("q") / "float", random_model("llama", CFG, 3))


@given(rows=st.integers(1, 9), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
@PROPERTY
def test_quantize_dequantize_bounds_and_packing(rows, groups, seed):
    w = torch.randn(rows, 32 * groups, generator=torch.Generator().manual_seed(seed))
    w[0] = 0.0  # an all-zero row: all-zero bytes in every stored tensor
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q[0].abs().max()) == 0 and float(scale[0]) == 0.0
    amax = w.abs().amax(dim=1)
    assert bool((scale <= amax / 127 + 1e-9).all() and (scale >= 0.6 * amax / 127 - 1e-9).all())
    err8 = (dequantize_int8(q, scale) - w).pow(2).sum(dim=1)  # no worse than no clipping
    plain = (torch.round(w / torch.where(amax > 0, amax / 127, 1)[:, None]).clamp(-127, 127)
             * (amax / 127)[:, None] - w).pow(2).sum(dim=1)
    assert bool((err8 <= plain + 1e-6).all())
    packed, qp = quantize_int4(w, 32)
    assert packed.shape == (rows, 16 * groups) and qp.shape == (rows, groups, 2)
    assert int(packed[0].max()) == 0 and float(qp[0].abs().max()) == 0.0
    err4 = (dequantize_int4(packed, qp) - w).abs().reshape(rows, groups, 32)
    assert bool((err4 <= qp[..., 0:1] / 2 + 1e-6).all())
    v = unpack_int4(packed)
    assert int(v.min()) >= -8 and int(v.max()) <= 7 and torch.equal(pack_int4(v), packed)


@pytest.mark.parametrize(("qcfg", "tp"), [(SCHEMES[0], 3), (SCHEMES[0], 6), (SCHEMES[1], 3),
                                           (SCHEMES[1], 6), (SCHEMES[2], 3), (SCHEMES[3], 6)],
                         ids=["int8-tp3", "int8-tp6", "int4g32-tp3", "int4g32-tp6", "int4g64-tp3",
                              "int8g32-tp6"])
def test_quantize_then_shard_equals_shard_then_quantize(qcfg, tp):
    """Every tensor, every rank: cutting the quantized global tensors by the split table's rules
    for integers and scales gives the same bytes as quantizing each rank's float slice (an
    int8 rowwise slice with its rows' maxima MAX-reduced over the ranks, scheme.py)."""
    geo = TPGeometry.of("llama", CFG)
    gen = torch.Generator().manual_seed(tp)
    kinds = set()
    for name, shape in expected_tensors("llama", CFG):
        full = torch.randn(shape, generator=gen)
        stored = quantize_weight(name, full, qcfg)
        kind = split_kind("llama", name)
        slices = [shard_tensor(full, shard_spec(kind, shape, geo, tp, r)) for r in range(tp)]
        scale = None
        if kind is SplitKind.ROWWISE and qcfg.scheme == "int8" and not qcfg.group_of(name):
            # per-row int8 scales: all-reduce MAX, then SUM
            amax = torch.stack([s.abs().amax(dim=1) for s in slices]).amax(dim=0)
            errors = sum(int8_clip_errors(s, amax) for s in slices)
            scale = int8_row_scale(amax, errors)
        for rank, local in enumerate(slices):
            direct = quantize_weight(name, local, qcfg, scale)
            assert list(direct) == list(stored)
            for sname, t in stored.items():
                kind = split_kind("llama", sname)
                kinds.add((sname.rsplit(".", 1)[-1], kind))
                cut = shard_tensor(t, shard_spec(kind, tuple(t.shape), geo, tp, rank))
                assert cut.dtype == direct[sname].dtype
                assert torch.equal(cut, direct[sname]), (sname, rank)
    if qcfg.scheme == "int8" and qcfg.group_size:  # groups follow their columns
        assert ("weight_group_scale", SplitKind.ROWWISE) in kinds
        assert ("weight_group_scale", SplitKind.VOCAB) in kinds
    elif qcfg.scheme == "int8":  # rowwise weights' per-row scales are whole on every rank
        assert ("weight_scale", SplitKind.REPLICATED) in kinds
        assert ("weight_scale", SplitKind.FUSED_QKV) in kinds
    else:  # rowwise weights' groups follow their columns
        assert ("weight_qparams", SplitKind.ROWWISE) in kinds


@pytest.mark.parametrize("qcfg", [SCHEMES[0], SCHEMES[1], SCHEMES[3]],
                         ids=["int8-per-row", "int4", "int8-g32"])
def test_reshard_quantize_at_tp3_then_back_equals_quantize_at_tp1(float_dir, tmp_path, qcfg):
    """float -> quantized TP=3 -> TP=1 equals float -> quantized TP=1, bit for bit; the
    manifest records the scheme and the integer dtypes; the TP=3 files hold the slices."""
    kw = {"quantize": qcfg.scheme, "group_size": qcfg.group_size,
          "quantize_embedding": qcfg.embedding}
    direct = reshard(float_dir, tmp_path / "q1", tp=1, **kw).dst
    rep = reshard(float_dir, tmp_path / "q3", tp=3, verify=True, **kw)  # TP=3 vs TP=1 logits
    assert rep.verify_error is not None and rep.verify_error <= 1e-5
    tp3 = rep.dst
    back = reshard(tp3, tmp_path / "back", tp=1).dst
    again = reshard(tp3, tmp_path / "again", tp=1, **kw).dst  # same scheme: passes through
    m = read_manifest(direct)
    assert m.quantization == qcfg.to_dict()
    wq = m.tensors["layers.0.attention.wqkv.weight"]
    assert wq.dtype == ("int8" if qcfg.scheme == "int8" else "uint8")
    a = load_file(direct / "rank-tp00-pp00.safetensors")
    for other in (back, again):
        assert read_manifest(other).tensors == m.tensors
        b = load_file(other / "rank-tp00-pp00.safetensors")
        assert list(a) == list(b)
        assert all(torch.equal(a[n], b[n]) for n in a)
    r1 = load_file(tp3 / "rank-tp01-pp00.safetensors")
    geo = TPGeometry.of("llama", CFG)
    for name in ("layers.1.attention.wo.weight", "layers.1.feed_forward.w13.weight"):
        spec = shard_spec(split_kind("llama", name), tuple(a[name].shape), geo, 3, 1)
        assert torch.equal(r1[name], shard_tensor(a[name], spec))


def test_quantized_tp3_generates_the_same_greedy_tokens_as_tp1(float_dir, tmp_path):
    """int4 g32 at TP=3 (threads, one rank file each) and TP=1: the same greedy tokens, by
    the kernels (one row per step) and the dense path (the prompt), logits within 1e-5 with
    torch's kernels, 2e-4 with ours (cpu_kernel.py): its activation rounding is a step
    function, so where the ranks' sums differ in the last bit a column can move by one step
    (1/32512 of its 32-column block's max), and 12 steps of a random model amplify that."""
    tp1 = reshard(float_dir, tmp_path / "q1", tp=1, quantize="int4", group_size=32).dst
    tp3 = reshard(float_dir, tmp_path / "q3", tp=3, quantize="int4", group_size=32).dst
    prompt = [3, 17, 40, 5, 9, 22, 1, 0]

    def greedy(comm, rank, directory):
        model = load_sharded_model(directory, comm, dtype=torch.float32)
        ids, logits = list(prompt), []
        cache = model.new_cache(1, 64, dtype=torch.float32, device="cpu")
        one = torch.ones(1, dtype=torch.long)
        with torch.inference_mode():
            pos = torch.arange(len(ids))[None]
            cache.begin_step(pos, one * len(ids))
            out = model(torch.tensor([ids]), pos, cache)[:, -1]
            for _ in range(12):
                logits.append(out[0])
                ids.append(int(out.argmax()))
                pos = torch.tensor([[len(ids) - 1]])
                cache.begin_step(pos, one)
                out = model(torch.tensor([[ids[-1]]]), pos, cache)[:, -1]
        return ids[len(prompt):], torch.stack(logits)

    ref_ids, ref_logits = run_ranks(1, greedy, tp1)[0]
    tol = 1e-5 if cpu_kernel.kernel() is None else 2e-4
    for directory in (tp1, tp3):
        for ids, logits in run_ranks(3, greedy, directory):
            assert ids == ref_ids
            assert rel_err(logits, ref_logits) <= tol
    assert len(set(ref_ids)) > 1  # not a degenerate repeat


def test_quantized_logits_stay_close_to_the_float_model(float_dir, tmp_path):
    """A random model (0.3-std weights, random norms) amplifies every error; int8 stays a few
    times closer to the float logits than int4 g32, both far from unrelated logits (~1)."""
    toks = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9).expand(2, 9)
    comm = ThreadGroup(1).comm(0)
    errs = {}
    with torch.inference_mode():
        ref = load_sharded_model(float_dir, comm)(toks, pos)
        for scheme in ("int8", "int4"):
            dst = reshard(float_dir, tmp_path / scheme, tp=1, quantize=scheme).dst
            errs[scheme] = rel_err(load_sharded_model(dst, comm)(toks, pos), ref)
    assert 0 < errs["int8"] <= 0.2 and errs["int4"] <= 0.8
    assert errs["int8"] * 2 < errs["int4"], errs


@pytest.mark.parametrize("rows", [1, 3, DENSE_MIN_ROWS, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
def test_kernels_equal_their_dequantized_weights(rows, dtype, ours, monkeypatch):
    """Int8Weight / Int4Weight: torch's kernels (few rows) and the dense copy (many rows)
    compute x @ dequantize(w).T (int4 with our kernel: its fp16 (scale, min) pairs, the one
    copy held); our kernel (few rows, where built) computes its reference
    (int8 activations, cpu_kernel.py), within 2% of that; the int8 rows lookup equals the
    dequantized rows."""
    if ours and cpu_kernel.kernel() is None:
        pytest.skip("quantized GEMV kernel not built here (no AVX512-VNNI or no compiler)")
    if not ours:
        monkeypatch.setattr(cpu_kernel, "kernel", lambda: None)
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=gen)
    x = torch.randn(rows, 128, generator=gen).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    in_kernel = ours and rows <= KERNEL_MAX_ROWS
    i8 = Int8Weight(*quantize_int8(w), dtype)
    assert ("_kw" in i8.__dict__) == ours
    ref8 = x.float() @ dequantize_int8(i8.q, i8.scale.float()).T
    if in_kernel:
        assert rel_err(i8(x), cpu_kernel.reference_int8(x, *quantize_int8(w))) <= tol
    assert rel_err(i8(x), ref8) <= (2e-2 if in_kernel else tol)
    if not in_kernel and rows >= DENSE_MIN_ROWS:
        # the dense path keeps the copy cpu_linear takes for it (the AMX GEMM's tiles, or
        # oneDNN's packed copy; no second one) as _fast, and cpu_linear then goes straight
        # there from the rows the dense path serves: same result as through the module
        owner = Linear(128, 96, bias=False)
        owner.weight = None
        owner.qweight = i8
        with torch.inference_mode():  # (the packed GEMMs are for inference only)
            y = i8(x)
            dense = i8.__dict__["_dense"]
            amx = cpu_gemm.use_amx(x)
            packed = cpu_gemm.use_packed_bf16(x, dense)
            assert ("_fast" in i8.__dict__) == (amx or packed)
            if amx or packed:
                fewest, copy, is_amx = i8.__dict__["_fast"]
                assert is_amx == amx
                assert copy is i8.__dict__["_amx_packed" if amx else "_bf16_packed"][1]
                assert fewest == max(DENSE_MIN_ROWS, KERNEL_MAX_ROWS + 1 if ours else 0) * 128
                assert torch.equal(cpu_gemm.cpu_linear(owner, x, None, None), y)
            assert rel_err(y, ref8) <= tol
    packed, qp = quantize_int4(w, 32)
    i4 = Int4Weight(packed, qp, dtype)
    if ours:  # the module holds only the kernel's copy: (scale, min) pairs in fp16
        sm = cpu_kernel.int4_scales(qp)
        qp = torch.stack([sm[..., 0], sm[..., 1] + 8 * sm[..., 0]], dim=-1)
    ref4 = x.float() @ dequantize_int4(packed, qp.to(dtype)).T
    if in_kernel:
        assert rel_err(i4(x), cpu_kernel.reference_int4(x, packed, qp)) <= tol
    assert rel_err(i4(x), ref4) <= (2e-2 if in_kernel else tol)
    odd = Int4Weight(packed[:37], qp[:37], dtype)  # 37 rows: padded to 48 for the kernel
    assert odd(x).shape == (rows, 37)
    assert rel_err(odd(x), ref4[:, :37]) <= (2e-2 if in_kernel else tol)
    ids = torch.tensor([[0, 95, 7]])
    assert rel_err(i8.rows(ids), dequantize_int8(i8.q, i8.scale.float())[ids]) <= tol
    qg, sg = quantize_int8(w, None, 32)  # grouped: our kernel, else the dense copy
    i8g = Int8Weight(qg, sg, dtype)
    assert torch.equal(i8g.q, qg) and torch.equal(i8g.scale, sg)  # unpacked where packed
    refg = x.float() @ dequantize_int8(qg, sg).to(dtype).float().T
    if in_kernel:
        assert rel_err(i8g(x), cpu_kernel.reference_int8(x, qg, sg)) <= tol
    assert rel_err(i8g(x), refg) <= (2e-2 if in_kernel else tol)
    assert rel_err(i8g.rows(ids), dequantize_int8(qg, sg)[ids]) <= tol
    i8g.__dict__.pop("_dense", None)
    stored = i8g.rows(ids)  # unpacked from the stored form
    i8g(x.reshape(-1, 128)[:1].expand(DENSE_MIN_ROWS + KERNEL_MAX_ROWS, 128).contiguous())
    assert i8g.__dict__["_dense"].dtype == dtype  # the dense path made its copy
    assert torch.equal(i8g.rows(ids), stored)  # now looked up there: the same values


@pytest.mark.skipif(amx_gemm.kernel() is None or cpu_kernel.kernel() is None,
                    reason="no AMX-BF16 or no quantized kernel here")
@pytest.mark.parametrize("n", [96, 37])  # 37: the pack pads to 48 outputs
def test_lean_mode_runs_the_amx_gemm_over_the_kernel_copy(monkeypatch, n):
    """SHARDSERVE_QUANT_DENSE_MIN_ROWS=0 (no dense copy): more rows than the kernel's run the
    AMX GEMM over the kernel's own int8 / int4 copy, dequantized tile by tile; no other copy is
    made and the result equals the AMX GEMM over the dense copy bit for bit. Few rows stay in
    the kernel."""
    monkeypatch.setattr(kernels, "DENSE_MIN_ROWS", 0)
    calls = []
    for name in ("int8_kernel", "int4_kernel"):
        real = getattr(amx_gemm, name)()
        monkeypatch.setattr(amx_gemm, name,
                            lambda r=real: (lambda *a: calls.append(1) or r(*a)))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, 128, generator=g)
    x = torch.randn(40, 128, generator=g).to(torch.bfloat16)
    i8 = Int8Weight(*quantize_int8(w, None, 32), torch.bfloat16)
    i4 = Int4Weight(*quantize_int4(w, 32), torch.bfloat16)
    with torch.inference_mode():
        for mod in (i8, i4):
            y = mod(x)  # [40, n]
            assert y.shape == (40, n)
            assert not {"_dense", "_amx_packed", "_fast"} & set(mod.__dict__)
            dense = F.pad(mod.dequantize().to(torch.bfloat16), (0, 0, 0, -n % 16))  # [48, 128]
            assert torch.equal(y, amx_gemm.linear(x, amx_gemm.pack(dense))[:, :n])
        assert len(calls) == 2
        i8(x[:KERNEL_MAX_ROWS])
        i4(x[:KERNEL_MAX_ROWS])
    assert len(calls) == 2


def test_manifest_hashes_cover_the_quantized_tensors(float_dir, tmp_path):
    dst = reshard(float_dir, tmp_path / "q", tp=1, quantize="int8").dst
    f = dst / "rank-tp00-pp00.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_sharded_model(dst, ThreadGroup(1).comm(0))


def test_bad_quantization_requests_are_clear_errors(float_dir, tmp_path, tiny_convlm_dir):
    with pytest.raises(CheckpointError, match="Llama family only"):
        reshard(tiny_convlm_dir, tmp_path / "c", tp=1, quantize="int8")
    q1 = reshard(float_dir, tmp_path / "q1", tp=1, quantize="int4", group_size=64).dst
    with pytest.raises(CheckpointError, match="already quantized"):
        reshard(q1, tmp_path / "x", tp=1, quantize="int8")
    # 192 / 6 = 32 input columns of wo per rank at TP=6: no whole group of 64
    with pytest.raises(ValueError, match="whole groups"):
        reshard(q1, tmp_path / "y", tp=6)
    assert not (tmp_path / "y").exists()
    m = json.loads((q1 / "manifest.json").read_text())
    m["quantization"]["scheme"] = "int3"
    (q1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="int3"):
        read_manifest(q1)


def test_quantize_state_of_a_slice_is_the_slice_of_the_quantized_state():
    """quantize_state (load-time quantization of one rank's float tensors) agrees with the
    split table's cut of the quantized global tensors at the vocabulary-padded lm rows."""
    qcfg = QuantConfig("int8")
    geo = TPGeometry.of("llama", CFG)
    emb = torch.randn(CFG.vocab_size, CFG.dim)
    glob = quantize_state({"tok_embeddings.weight": emb}, qcfg)
    spec = shard_spec(SplitKind.VOCAB, tuple(emb.shape), geo, 2, 1)  # ends in a padding row
    assert spec.pad == 1
    local = quantize_state({"tok_embeddings.weight": shard_tensor(emb, spec)}, qcfg)
    for name, t in glob.items():
        cut = shard_tensor(t, shard_spec(split_kind("llama", name), tuple(t.shape), geo, 2, 1))
        assert torch.equal(cut, local[name])


def _write_q4_gguf(path) -> None:
    """A one-layer Llama GGUF whose linear weights are Q4_1 (Q4_0 for V), dim 64."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 64),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 2),
                   (w.add_head_count_kv, 1), (w.add_context_length, 64),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("a") + i) for i in range(16)])
    w.add_token_types([1] * 16)
    w.add_token_merges([])
    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    for name, shape, qt in (("token_embd.weight", (16, 64), None),
                            ("blk.0.attn_norm.weight", (64,), None),
                            ("blk.0.attn_q.weight", (64, 64), Q.Q4_1),
                            ("blk.0.attn_k.weight", (32, 64), Q.Q4_1),
                            ("blk.0.attn_v.weight", (32, 64), Q.Q4_0),
                            ("blk.0.attn_output.weight", (64, 64), Q.Q4_1),
                            ("blk.0.ffn_norm.weight", (64,), None),
                            ("blk.0.ffn_gate.weight", (64, 64), Q.Q4_1),
                            ("blk.0.ffn_up.weight", (64, 64), Q.Q4_1),
                            ("blk.0.ffn_down.weight", (64, 64), Q.Q4_1),
                            ("output_norm.weight", (64,), None)):
        arr = rng.standard_normal(shape).astype(np.float32)
        if qt is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_q4_blocks_are_taken_over_without_a_float_round_trip(tmp_path):
    """int4 g32 from a Q4_1/Q4_0 GGUF: the manifest says where it came from, and every linear
    weight dequantizes to exactly what the float import dequantizes (rotary rows included)."""
    from shardserve_sharding.checkpoint.source import ShardserveSource

    src = tmp_path / "m.gguf"
    _write_q4_gguf(src)
    fl = reshard(src, tmp_path / "float", tp=1).dst
    q = reshard(src, tmp_path / "q", tp=1, quantize="int4", group_size=32).dst
    assert read_manifest(q).quantization["origin"] == "gguf:Q4_0+Q4_1"
    f, s = ShardserveSource(fl), ShardserveSource(q)
    for name in ("layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight",
                 "layers.0.feed_forward.w13.weight", "layers.0.feed_forward.w2.weight"):
        ref = f.tensor(name)
        got = dequantize_int4(s.tensor(name), s.tensor(name + "_qparams"))
        assert rel_err(got, ref) <= 1e-6, name


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages a model holds for its weights: parameters and every
    quantized weight module's tensors (buffers and the kernel copies in its __dict__)."""
    tensors = list(model.parameters())
    for m in model.modules():
        q = getattr(m, "qweight", None)
        if q is not None:
            tensors += list(q.buffers())
            tensors += [t for t in q.__dict__.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("qcfg", [SCHEMES[3], SCHEMES[0], SCHEMES[1]],
                         ids=["int8-g32", "int8-per-row", "int4-g32"])
def test_a_loaded_quantized_model_holds_one_copy_of_its_weights(float_dir, tmp_path, qcfg):
    """The bytes a loaded quantized model holds are its checkpoint's bytes give or take the
    kernel's tile padding and fp16 scales (was twice the int8 bytes: stored and repacked
    copies), until a many-row call makes the dense copy."""
    if cpu_kernel.kernel() is None:
        pytest.skip("quantized GEMV kernel not built here: torch's layouts are held")
    from shardserve_sharding.checkpoint.io import load_model

    dst = reshard(float_dir, tmp_path / "q", tp=1, quantize=qcfg.scheme,
                  group_size=qcfg.group_size, quantize_embedding=qcfg.embedding).dst
    stored = sum(t.numel() * t.element_size()
                 for t in load_file(dst / "rank-tp00-pp00.safetensors").values())
    model = load_model(dst).model
    held = _held_bytes(model)
    assert 0.8 * stored <= held <= 1.1 * stored, (held, stored)
