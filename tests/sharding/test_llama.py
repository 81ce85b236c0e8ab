"""Llama model: cached prefill/decode equals a full forward, ragged rows equal single rows."""

from __future__ import annotations

import pytest
import torch

from shardserve_sharding.models.llama import LLAMA_CONFIGS, Linear, LlamaConfig, Transformer


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.fixture(params=["tiny", "tiny-untied"])
def model(request) -> Transformer:
    torch.manual_seed(0)
    return Transformer(LLAMA_CONFIGS[request.param]).eval()


@torch.inference_mode()
def test_cached_decode_matches_full_forward(model):
    cfg = model.config
    toks = torch.randint(0, cfg.vocab_size, (1, 12))
    full = model(toks, torch.arange(12)[None])  # [1, 12, V]
    cache = model.new_cache(1, 16, dtype=torch.float32, device="cpu")
    pos = torch.arange(5)[None]
    cache.begin_step(pos, torch.tensor([5]))
    out = [model(toks[:, :5], pos, cache)]
    for t in range(5, 12):
        p = torch.tensor([[t]])
        cache.begin_step(p, torch.tensor([1]))
        out.append(model(toks[:, t : t + 1], p, cache))
    assert rel_err(torch.cat(out, 1), full) <= 1e-5


@torch.inference_mode()
def test_ragged_batch_matches_single_rows(model):
    cfg = model.config
    lens = [3, 9, 6]
    prompts = [torch.randint(0, cfg.vocab_size, (n,)) for n in lens]
    width = max(lens)
    toks = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    cache = model.new_cache(3, 16, dtype=torch.float32, device="cpu")
    pos = torch.arange(width).expand(3, width)
    cache.begin_step(pos, torch.tensor(lens))
    logits = model(toks, pos, cache, logits_index=torch.tensor(lens) - 1)  # [3, V]
    nxt = torch.randint(0, cfg.vocab_size, (3, 1))
    p2 = torch.tensor(lens)[:, None]
    cache.begin_step(p2, torch.ones(3, dtype=torch.long))
    logits2 = model(nxt, p2, cache, logits_index=torch.zeros(3, dtype=torch.long))
    for i, p in enumerate(prompts):
        seq = torch.cat([p, nxt[i]])[None]
        ref = model(seq, torch.arange(len(seq[0]))[None])[0]  # [T, V]
        assert rel_err(logits[i], ref[-2]) <= 1e-5
        assert rel_err(logits2[i], ref[-1]) <= 1e-5
    # dropping a row keeps the others' caches
    cache.select(torch.tensor([2, 0]))
    p3 = torch.tensor([[lens[2] + 1], [lens[0] + 1]])
    cache.begin_step(p3, torch.ones(2, dtype=torch.long))
    nxt3 = torch.randint(0, cfg.vocab_size, (2, 1))
    out3 = model(nxt3, p3, cache, logits_index=torch.zeros(2, dtype=torch.long))
    for j, i in enumerate([2, 0]):
        seq = torch.cat([prompts[i], nxt[i], nxt3[j]])[None]
        ref = model(seq, torch.arange(len(seq[0]))[None])[0, -1]
        assert rel_err(out3[j], ref) <= 1e-5


def test_causal():
    torch.manual_seed(1)
    m = Transformer(LLAMA_CONFIGS["tiny"]).eval()
    a = torch.randint(0, 512, (1, 10))
    b = a.clone()
    b[0, 7] = (b[0, 7] + 1) % 512
    with torch.inference_mode():
        la, lb = m(a, torch.arange(10)[None]), m(b, torch.arange(10)[None])
    assert torch.equal(la[:, :7], lb[:, :7])
    assert not torch.equal(la[:, 7:], lb[:, 7:])


def test_tied_and_untied():
    tied = Transformer(LLAMA_CONFIGS["tiny"])
    assert tied.output.weight is tied.tok_embeddings.weight
    untied = Transformer(LLAMA_CONFIGS["tiny-untied"])
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_config_validation_and_round_trip():
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.head_dim == 64
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, intermediate_size=8)
    with pytest.raises(ValueError, match="unknown llama config keys"):
        LlamaConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@torch.inference_mode()
def test_bf16_close_to_fp32():
    torch.manual_seed(2)
    m = Transformer(LLAMA_CONFIGS["tiny"]).eval()
    toks = torch.randint(0, 512, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    ref = m(toks, pos)
    out = m.to(torch.bfloat16)(toks, pos).float()
    assert rel_err(out, ref) <= 5e-2


def test_compiled_bf16_decode_keeps_the_gemv_opaque_and_equal():
    """Under torch.compile a bf16 batch-1 linear goes through the opaque shardserve::gemv op
    (dynamo traces it through its fake kernel); the step equals the eager one bitwise."""
    from shardserve_sharding.models.cpu_gemm import opaque_linear

    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 64).bfloat16(), torch.randn(96, 64).bfloat16()
    assert torch.equal(opaque_linear(x, w), torch.nn.functional.linear(x, w))
    m = Transformer(LLAMA_CONFIGS["tiny"]).to(torch.bfloat16).eval()
    tok = torch.randint(0, LLAMA_CONFIGS["tiny"].vocab_size, (1, 1))
    pos = torch.tensor([[0]])
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.inference_mode():
        want = m(tok, pos)
        got = torch.compile(m, backend=backend, fullgraph=True)(tok, pos)
    assert torch.equal(got, want)
    assert any("shardserve.gemv" in t for t in seen), seen[:20]


def test_fp32_shadow_gemm_matches_blockwise_and_follows_weight_changes():
    """bf16 GEMMs of many rows over the cached fp32 copy of the weight equal the block-upcast
    ones; changing the weight in place rebuilds the copy."""
    from shardserve_sharding.models import cpu_gemm

    torch.manual_seed(0)
    lin = Linear(64, 300, bias=False).to(torch.bfloat16)
    x = torch.randn(32, 64).bfloat16()
    with torch.inference_mode():
        blockwise = cpu_gemm.linear_bf16_as_fp32(x, lin.weight)
        shadow = cpu_gemm.fp32_shadow(lin, lin.weight)
        assert shadow.dtype == torch.float32 and torch.equal(shadow, lin.weight.float())
        got = cpu_gemm.linear_bf16_as_fp32(x, lin.weight, None, shadow)
        assert rel_err(got.float(), blockwise.float()) <= 1e-2  # both round to bf16 at the end
        assert torch.equal(got.float(), (x.float() @ lin.weight.float().T).bfloat16().float())
    with torch.no_grad():
        lin.weight.mul_(2)
    assert torch.equal(cpu_gemm.fp32_shadow(lin, lin.weight), lin.weight.float())
    assert "_fp32_shadow" not in dict(lin.named_buffers()) and len(lin.state_dict()) == 1


def test_packed_fp32_gemm_matches_reference_and_follows_weight_changes():
    """The eager fp32 GEMM of bf16 weights (oneDNN over a packed fp32 copy where torch has it)
    equals x.float() @ w.float().T rounded to bf16, for 2-D and 3-D inputs with a bias, and a
    changed weight is repacked."""
    from shardserve_sharding.models import cpu_gemm

    torch.manual_seed(0)
    lin = Linear(64, 300, bias=True).to(torch.bfloat16)
    for shape in ((32, 64), (2, 7, 64)):
        x = torch.randn(*shape).bfloat16()
        with torch.inference_mode():
            got = cpu_gemm.fp32_gemm(lin, x, lin.weight, lin.bias)
            want = (x.float() @ lin.weight.float().T + lin.bias.float()).bfloat16()
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert rel_err(got.float(), want.float()) <= 1e-2  # one bf16 rounding apart at most
    if cpu_gemm._PACKED_GEMM:
        assert "_fp32_packed" in lin.__dict__
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode():
        again = cpu_gemm.fp32_gemm(lin, x, lin.weight, lin.bias)
    want2 = (x.float() @ lin.weight.float().T + lin.bias.float()).bfloat16()
    assert rel_err(again.float(), want2.float()) <= 1e-2


def test_compiled_bf16_gemm_reads_the_prepared_fp32_copy_without_a_graph_break():
    """Inside torch.compile a bf16 GEMM of many rows is one graph (fullgraph=True fails on a
    break): the fp32 copy comes from prepare_fp32_shadows, not from a data_ptr check."""
    from shardserve_sharding.models import cpu_gemm

    torch.manual_seed(0)
    lin = Linear(64, 300, bias=False).to(torch.bfloat16)
    x = torch.randn(8, 64).bfloat16()
    if not cpu_gemm.bf16_emulated(x):
        pytest.skip("bf16 is native on this CPU: GEMMs stay bf16")
    assert cpu_gemm.prepare_fp32_shadows(lin) == (1 if cpu_gemm.FP32_SHADOW else 0)
    with torch.inference_mode():
        assert cpu_gemm.gemm_as_fp32(x, lin.weight)
        want = (x.float() @ lin.weight.float().T).bfloat16()
        got = torch.compile(lin, backend="eager", fullgraph=True)(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want.float()) <= 1e-2  # one bf16 rounding apart at most


def test_packed_bf16_gemm_takes_few_rows_by_default_and_matches_plain():
    """Where bf16 is native, the default (SHARDSERVE_PACKED_BF16 unset) runs GEMMs of at most
    PACKED_BF16_MAX_ROWS rows over the packed copy and larger ones through F.linear; both give
    the plain bf16 GEMM's result."""
    from shardserve_sharding.models import cpu_gemm

    torch.manual_seed(0)
    lin = Linear(64, 300, bias=False).to(torch.bfloat16)
    small = torch.randn(1, cpu_gemm.PACKED_BF16_MAX_ROWS, 64).bfloat16()
    large = torch.randn(cpu_gemm.PACKED_BF16_MAX_ROWS + 1, 64).bfloat16()
    if not (cpu_gemm.PACKED_BF16 and cpu_gemm._PACKED_ROWS_LIMIT is not None):
        pytest.skip("no native bf16 here, or SHARDSERVE_PACKED_BF16 set to 0 or 1")
    with torch.inference_mode():
        assert cpu_gemm.use_packed_bf16(small, lin.weight)
        assert not cpu_gemm.use_packed_bf16(large, lin.weight)
        for x in (small, large):
            got = lin(x)
            want = torch.nn.functional.linear(x, lin.weight)
            assert rel_err(got.float(), want.float()) <= 1e-2  # one bf16 rounding apart at most
    assert "_bf16_packed" in lin.__dict__


def test_fused_path_follows_a_swapped_linear_layer():
    """The fused decode path calls each block's parts through a cached tuple (_FastParts);
    replacing a part after a forward (as the TP and quantization code do, by setattr) is seen
    by the next forward: its output equals the plain path's with the new part."""
    from shardserve_sharding.models import fused_ops

    if fused_ops.kernels() is None:
        pytest.skip("the fused kernels could not be built here (no C++ toolchain)")
    cfg = LLAMA_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    model.reset_buffers()
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    with torch.inference_mode():
        before = model(tokens, pos)
        new = Linear(cfg.dim, cfg.intermediate_size * 2, bias=False).to(torch.bfloat16)
        model.layers[1].feed_forward.w13 = new  # after the cache was built
        fused = model(tokens, pos)
        fused_ops._STATE["mod"], kernels = None, fused_ops._STATE["mod"]
        try:
            plain = model(tokens, pos)  # the torch path reads the modules directly
        finally:
            fused_ops._STATE["mod"] = kernels
    assert not torch.equal(before, fused)
    assert torch.equal(fused, plain)
