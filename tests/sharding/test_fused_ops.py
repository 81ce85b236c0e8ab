"""The fused CPU kernels (models/fused_ops.py) are bit-identical to the torch path they replace:
each kernel against its plain-torch reference (row widths with and without vector tails, many
rows over 2 threads, large and tiny values), and bf16 Llama forwards (prefill and cached decode)
with and without them; training and fp32 never take them; bad inputs raise, not crash."""

from __future__ import annotations

import pytest
import torch
from torch_threads import torch_threads

from shardserve_sharding.models import fused_ops
from shardserve_sharding.models.llama import LLAMA_CONFIGS, Transformer, rope_tables

pytestmark = pytest.mark.skipif(fused_ops.kernels() is None,
                                reason="the kernels could not be built here (no C++ toolchain)")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _rows(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, n).unsqueeze(1)  # [n, 1]: tiny to large rows
    return (torch.randn(n, c, generator=g) * scale).bfloat16()  # [n, c]


@pytest.mark.parametrize("width", [576, 48, 4096])  # SmolLM2; a vector tail; cascade levels
@pytest.mark.parametrize("threads", [1, 2])
def test_add_rms_norm_equals_add_then_rms_norm(width, threads):
    x, delta = _rows(37, width, 0), _rows(37, width, 1)
    w = (torch.randn(width, generator=torch.Generator().manual_seed(2)) + 1).bfloat16()
    with torch_threads(threads), torch.inference_mode():
        x1, x2 = x.clone(), x.clone()
        y1 = fused_ops.kernels().add_rms_norm_(x1, delta, w, 1e-5)  # [37, width]
        y2 = fused_ops.reference_add_rms_norm_(x2, delta, w, 1e-5)
        assert _bits_equal(x1, x2) and _bits_equal(y1, y2)
        assert not _bits_equal(x1, x)  # the residual was updated in place
        n1 = fused_ops.kernels().add_rms_norm_(x1, None, w, 1e-6)  # the norm alone
        assert _bits_equal(n1, fused_ops.reference_add_rms_norm_(x2, None, w, 1e-6))


def test_rms_norm_adds_in_torchs_order():
    """Summing x^2 in another order changes ~1 row in 1,000 after rounding to bf16: over 8,000
    rows the kernel must still match exactly, where an fp64 sum does not."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(8000, 576, generator=g) * 3).bfloat16()
    w = (torch.randn(576, generator=g) + 1).bfloat16()
    with torch.inference_mode():
        ref = fused_ops.reference_add_rms_norm_(x.clone(), None, w, 1e-5)  # [8000, 576]
        assert _bits_equal(fused_ops.kernels().add_rms_norm_(x.clone(), None, w, 1e-5), ref)
        xf = x.float()
        r = torch.rsqrt(xf.double().pow(2).mean(-1, keepdim=True).float() + 1e-5)  # [8000, 1]
        assert not _bits_equal((w * (xf * r).bfloat16()), ref)


@pytest.mark.parametrize("head_dim,heads,all_heads", [(64, 12, 15), (16, 6, 8), (128, 5, 6)])
def test_rotary_in_place_equals_apply_rope(head_dim, heads, all_heads):
    cos, sin = rope_tables(head_dim, 4096, 100000.0)  # [S, D] fp32
    qkv = _rows(29, all_heads * head_dim, 3)  # [N, Hall * D]
    pos = torch.randint(0, 4096, (29,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got, ref = qkv.clone(), qkv.clone()
        fused_ops.kernels().rotary_(got, pos, cos, sin, heads, head_dim)
        fused_ops.reference_rotary_(ref, pos, cos, sin, heads, head_dim)
    assert _bits_equal(got, ref)
    assert _bits_equal(got[:, heads * head_dim :], qkv[:, heads * head_dim :])  # v untouched
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        fused_ops.kernels().rotary_(got, pos + 4096, cos, sin, heads, head_dim)
    with pytest.raises(RuntimeError, match="fp32 cos, sin"):
        fused_ops.kernels().rotary_(got, pos, cos.bfloat16(), sin, heads, head_dim)


@pytest.mark.parametrize("inner", [1536, 40])
def test_silu_mul_equals_silu_times_up(inner):
    gate_up = _rows(33, 2 * inner, 5) * 4  # [N, 2I], silu's whole range
    with torch.inference_mode():
        got = fused_ops.kernels().silu_mul(gate_up)  # [N, I]
    assert _bits_equal(got, fused_ops.reference_silu_mul(gate_up))


def test_bad_inputs_raise():
    k = fused_ops.kernels()
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bf16"):
        k.add_rms_norm_(x.float(), None, torch.ones(64).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="must equal the weight"):
        k.add_rms_norm_(x, None, torch.ones(32).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="like x"):
        k.add_rms_norm_(x, x[:1], torch.ones(64).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        k.silu_mul(x.t())


@pytest.fixture(params=["tiny", "tiny-untied"])
def bf16_llama(request) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(LLAMA_CONFIGS[request.param]).to(torch.bfloat16).eval()
    model.reset_buffers()  # fp32 rotary tables, as the loader leaves them
    return model


def _prefill_and_decode(model: Transformer) -> list[torch.Tensor]:
    """Logits of a ragged 3-row prefill and three cached decode steps, bf16."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, cfg.vocab_size, (3, 9), generator=g)
    cache = model.new_cache(3, 16, dtype=torch.bfloat16, device="cpu")
    pos = torch.arange(9).expand(3, 9)
    lens = torch.tensor([9, 4, 7])
    cache.begin_step(pos, lens)
    out = [model(toks, pos, cache, logits_index=lens - 1)]  # [3, V]
    for _ in range(3):
        nxt = out[-1].argmax(-1, keepdim=True)  # [3, 1] greedy
        p = lens[:, None]
        cache.begin_step(p, torch.ones(3, dtype=torch.long))
        out.append(model(nxt, p, cache, logits_index=torch.zeros(3, dtype=torch.long)))
        lens = lens + 1
    out.append(model(toks, pos))  # no cache, every position's logits [3, 9, V]
    return out


def test_bf16_forward_with_kernels_is_bit_identical(bf16_llama, monkeypatch):
    with torch.inference_mode():
        fused = _prefill_and_decode(bf16_llama)
        monkeypatch.setitem(fused_ops._STATE, "mod", None)  # the plain torch path
        assert not fused_ops.active(torch.zeros(1, dtype=torch.bfloat16))
        plain = _prefill_and_decode(bf16_llama)
    for a, b in zip(fused, plain, strict=True):
        assert _bits_equal(a, b)


def test_training_and_fp32_keep_the_torch_path():
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert fused_ops.active(x)
        assert not fused_ops.active(x.float())
    with torch.no_grad():
        assert fused_ops.active(x)
    assert not fused_ops.active(x)  # autograd on: training
    model = Transformer(LLAMA_CONFIGS["tiny"]).to(torch.bfloat16)
    model.reset_buffers()
    toks = torch.randint(0, 500, (1, 5))
    loss = model(toks, torch.arange(5)[None]).float().logsumexp(-1).mean()
    loss.backward()  # the plain path: gradients reach every norm weight
    assert all(layer.attention_norm.weight.grad is not None for layer in model.layers)
