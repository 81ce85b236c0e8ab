"""The C++ decode attention (engine/decode_attention.py) equals its plain-torch reference and
SDPA over gathered keys: GQA, ragged lengths (1 key to several blocks), shuffled block tables
with padding past each row's blocks, garbage in unread slots, fp32 and bf16, 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_threads import torch_threads

from shardserve_server.engine import decode_attention

pytestmark = pytest.mark.skipif(decode_attention.kernel() is None,
                                reason="the kernel could not be built here (no C++ toolchain)")


def _case(dtype, rows=5, h=6, hkv=2, d=16, bs=4, num_blocks=40, seed=0, nb=6):
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(num_blocks * bs, 2, hkv, d, generator=g) * 3).to(dtype)  # [slots,2,Hkv,D]
    lens = torch.tensor([1, bs, bs + 1, 3 * bs - 1, 5 * bs][:rows])  # [R] keys per row
    perm = torch.randperm(num_blocks, generator=g)[: rows * nb].view(rows, nb)  # distinct blocks
    tables = perm.clone()
    for r in range(rows):  # -1 past the row's blocks, as the scheduler pads
        tables[r, (int(lens[r]) + bs - 1) // bs :] = -1
    q = torch.randn(rows, h, d, generator=g).to(dtype)  # [R, H, D]
    return q, pool, tables, lens, bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", ["generic", "smollm2", "llama3"])
def test_kernel_equals_reference_and_sdpa(dtype, threads, shape):
    """generic: head size and group known only at run time; smollm2 (D 64, G 3) and llama3
    (D 128, G 4): the compiled-in shapes, which take the AVX512-BF16 path for bf16 where the
    CPU has it (16 keys a step: the lengths cover a partial last step and several blocks)."""
    h, hkv, d = {"generic": (6, 2, 16), "smollm2": (9, 3, 64), "llama3": (8, 2, 128)}[shape]
    q, pool, tables, lens, bs = _case(dtype, h=h, hkv=hkv, d=d, bs=16, num_blocks=64, nb=6)
    if shape == "generic":
        q, pool, tables, lens, bs = _case(dtype)
    scale = q.shape[-1] ** -0.5
    with torch_threads(threads):
        got = decode_attention.kernel()(q, pool, tables, lens, bs, scale)  # [R, H, D]
    ref = decode_attention.reference(q, pool, tables, lens, bs, scale)
    # fp32: summation order only; bf16: both round an fp32 result once (one ulp)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    hkv = pool.shape[2]
    for r in range(q.shape[0]):  # SDPA (fp32) over the row's gathered keys, GQA expanded
        n = int(lens[r])
        t = torch.arange(n)
        kv = pool[tables[r, t // bs] * bs + t % bs].float()  # [n, 2, Hkv, D]
        k = kv[:, 0].transpose(0, 1)[None]  # [1, Hkv, n, D]
        v = kv[:, 1].transpose(0, 1)[None]
        want = F.scaled_dot_product_attention(q[r].float()[None, :, None], k, v,
                                              enable_gqa=q.shape[1] != hkv)[0, :, 0]  # [H, D]
        assert (got[r].float() - want).abs().max() <= tol * want.abs().max(), r


def test_kernel_rejects_bad_shapes():
    q, pool, tables, lens, bs = _case(torch.float32)
    with pytest.raises(RuntimeError):
        decode_attention.kernel()(q[:, :5].contiguous(), pool, tables, lens, bs, 1.0)  # H%Hkv
    with pytest.raises(RuntimeError, match="block id"):
        decode_attention.kernel()(q, pool, tables.clamp(max=0) - 1, lens, bs, 1.0)
    with pytest.raises(RuntimeError, match="key count"):
        decode_attention.kernel()(q, pool, tables, lens + 100, bs, 1.0)
    with pytest.raises(RuntimeError):
        decode_attention.kernel()(q, pool.to(torch.bfloat16), tables, lens, bs, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_kernel_writes_every_token_and_attends_the_decode_rows_in_place(dtype):
    """paged_attend_step reads q, k, v as views of one QKV buffer, writes all N tokens' K/V into
    their slots (pool equals index_copy_'s), and attends the last R tokens (decode rows whose
    newest key is the token just written) into the last R rows of out, leaving the rows before
    them (prompt chunks, filled by the caller) untouched."""
    q0, pool, tables, lens, bs = _case(dtype)
    r, h, d = q0.shape
    hkv = pool.shape[2]
    n = r + 3  # 3 prompt-chunk tokens, then the R decode rows
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, h + 2 * hkv, d, generator=g).to(dtype)  # [N, H + 2 Hkv, D]
    q, k, v = qkv[:, :h], qkv[:, h : h + hkv], qkv[:, h + hkv :]  # views, row stride (H+2Hkv)D
    dec_slots = torch.stack([tables[i, (int(lens[i]) - 1) // bs] * bs + (int(lens[i]) - 1) % bs
                             for i in range(r)])  # each decode row's newest key
    used = set((tables[tables >= 0, None] * bs + torch.arange(bs)).flatten().tolist())
    free = [s for s in range(pool.shape[0]) if s not in used][:3]
    write = torch.cat([torch.tensor(free), dec_slots])  # [N]
    want_pool = pool.clone()
    want_pool.index_copy_(0, write, torch.stack([k, v], dim=1))  # [N, 2, Hkv, D]
    out = torch.full((n, h, d), 7.0, dtype=dtype)
    decode_attention.step_kernel()(q, k, v, pool, write, tables, lens, out, bs, d ** -0.5)
    assert torch.equal(pool, want_pool)
    ref = decode_attention.reference(q[3:].contiguous(), want_pool, tables, lens, bs, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (out[3:].float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    assert bool((out[:3] == 7.0).all())
    with pytest.raises(RuntimeError, match="write slot"):
        decode_attention.step_kernel()(q, k, v, pool, write + pool.shape[0], tables, lens, out,
                                       bs, 1.0)
    with pytest.raises(RuntimeError, match="block id"):
        decode_attention.step_kernel()(q, k, v, pool, write, tables.clamp(max=0) - 1, lens, out,
                                       bs, 1.0)


def test_qkv_kernel_equals_step_kernel_on_the_same_buffer():
    """paged_attend_qkv (the fused QKV output itself, views made in C++) writes the same pool
    and returns the same rows as paged_attend_step over the Python views of that buffer."""
    q0, pool, tables, lens, bs = _case(torch.bfloat16, h=9, hkv=3, d=64, bs=16, num_blocks=64)
    r, h, d = q0.shape
    hkv = pool.shape[2]
    n = r + 2
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g).to(torch.bfloat16)  # [N, (H+2Hkv)D]
    used = set((tables[tables >= 0, None] * bs + torch.arange(bs)).flatten().tolist())
    free = [s for s in range(pool.shape[0]) if s not in used][:2]
    dec = [int(tables[i, (int(lens[i]) - 1) // bs]) * bs + (int(lens[i]) - 1) % bs
           for i in range(r)]
    write = torch.tensor(free + dec)  # [N]
    heads = qkv.view(n, h + 2 * hkv, d)
    pool_a, pool_b = pool.clone(), pool.clone()
    out_a = torch.zeros(n, h, d, dtype=torch.bfloat16)
    decode_attention.step_kernel()(heads[:, :h], heads[:, h : h + hkv], heads[:, h + hkv :],
                                   pool_a, write, tables, lens, out_a, bs, d ** -0.5)
    out_b = decode_attention.qkv_kernel()(qkv, pool_b, write, tables, lens, bs, d ** -0.5)
    assert out_b.shape == (n, h * d)
    assert torch.equal(pool_a, pool_b)
    assert torch.equal(out_a[2:].reshape(r, h * d), out_b[2:])
    with pytest.raises(RuntimeError, match="width"):
        decode_attention.qkv_kernel()(qkv[:, :-1], pool_b, write, tables, lens, bs, 1.0)
