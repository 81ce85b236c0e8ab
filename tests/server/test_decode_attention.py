"""The C++ decode attention (engine/decode_attention.py) equals its plain-torch reference and
SDPA over gathered keys: GQA, ragged lengths (1 key to several blocks), shuffled block tables
with padding past each row's blocks, garbage in unread slots, fp32 and bf16, 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve_server.engine import decode_attention

pytestmark = pytest.mark.skipif(decode_attention.kernel() is None,
                                reason="the kernel could not be built here (no C++ toolchain)")


def _case(dtype, rows=5, h=6, hkv=2, d=16, bs=4, num_blocks=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(num_blocks * bs, 2, hkv, d, generator=g) * 3).to(dtype)  # [slots,2,Hkv,D]
    lens = torch.tensor([1, bs, bs + 1, 3 * bs - 1, 5 * bs][:rows])  # [R] keys per row
    nb = 6
    perm = torch.randperm(num_blocks, generator=g)[: rows * nb].view(rows, nb)  # distinct blocks
    tables = perm.clone()
    for r in range(rows):  # -1 past the row's blocks, as the scheduler pads
        tables[r, (int(lens[r]) + bs - 1) // bs :] = -1
    q = torch.randn(rows, h, d, generator=g).to(dtype)  # [R, H, D]
    return q, pool, tables, lens, bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_reference_and_sdpa(dtype, threads):
    q, pool, tables, lens, bs = _case(dtype)
    scale = q.shape[-1] ** -0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_attention.kernel()(q, pool, tables, lens, bs, scale)  # [R, H, D]
    finally:
        torch.set_num_threads(before)
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
