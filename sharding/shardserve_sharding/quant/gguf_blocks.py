"""llama.cpp's Q4_0 / Q4_1 blocks taken over as int4 group-32 weights, without a float round
trip.

A Q4_1 block holds 32 consecutive input columns of one row: fp16 d, fp16 m, then 16 bytes of
4-bit q (byte j: column j in the low nibble, column j + 16 in the high one); w = d q + m. In
our int4 scheme (scheme.py) that is v = q - 8, scale = d, offset = m + 8 d; Q4_0 (fp16 d, then
the same 16 bytes; w = d (q - 8)) is offset 0. The integers are copied bit for bit (only their
nibble order changes) and the scales exactly, so the quantized model is the GGUF's own
model rather than a requantization of its dequantized values. Q and K rows get the same
rotary un-permutation as the float import (importers/gguf_reader.py), whole rows at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .scheme import pack_int4

BLOCK = 32
TYPES = {"Q4_0": 18, "Q4_1": 20}
"""GGUF block types taken over, and their bytes per block of 32 values."""


def _blocks(source: Any, gname: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed uint8 [N, K/2], qparams float32 [N, K/32, 2]) of GGUF tensor gname, or None
    when it is not stored in a block type taken over."""
    t = source._tensors.get(gname)
    if t is None or t.tensor_type.name not in TYPES:
        return None
    per = TYPES[t.tensor_type.name]
    n, k = (int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (input) first
    raw = np.asarray(t.data, dtype=np.uint8).reshape(n, k // BLOCK, per)  # [N, K/32, bytes]
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if per == 20:  # Q4_1: d, m, qs
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        offset = m + 8.0 * d
        qs = raw[..., 4:]
    else:  # Q4_0: d, qs
        offset = np.zeros_like(d)
        qs = raw[..., 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [N, K/32, 32]: columns 0-15, 16-31
    v = torch.from_numpy(q.reshape(n, k).astype(np.int16)) - 8  # [N, K] in [-8, 7]
    qparams = torch.from_numpy(np.stack([d, offset], axis=-1))  # [N, K/32, 2]
    return pack_int4(v), qparams


def _unpermute(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    from ..importers.gguf_reader import unpermute_rope

    return unpermute_rope(t, n_heads).contiguous()


def gguf_int4(source: Any, name: str) -> dict[str, torch.Tensor] | None:
    """The int4 g32 stored tensors of Llama weight `name` straight from a GGUFLlamaSource's
    blocks, or None when any part of it is not Q4_0 / Q4_1 (then it is quantized from floats)."""
    from ..split_table import QPARAMS_SUFFIX

    if not name.startswith("layers."):
        return None
    _, idx, rest = name.split(".", 2)
    b = f"blk.{idx}."
    c = source.config
    parts = {
        "attention.wo.weight": [("attn_output.weight", None)],
        "feed_forward.w2.weight": [("ffn_down.weight", None)],
        "attention.wqkv.weight": [("attn_q.weight", c.n_heads), ("attn_k.weight", c.n_kv_heads),
                                  ("attn_v.weight", None)],
        "feed_forward.w13.weight": [("ffn_gate.weight", None), ("ffn_up.weight", None)],
    }.get(rest)
    if parts is None:
        return None
    packed, qparams = [], []
    for gname, heads in parts:
        got = _blocks(source, b + gname)
        if got is None:
            return None
        p, qp = got
        if heads is not None:  # llama.cpp's rotary row order -> rotate-half
            p, qp = _unpermute(p, heads), _unpermute(qp, heads)
        packed.append(p)
        qparams.append(qp)
    return {name: torch.cat(packed), name + QPARAMS_SUFFIX: torch.cat(qparams)}


def gguf_block_types(source: Any) -> set[str]:
    """The block types of a GGUF source's layer weights (the linear layers)."""
    keys = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
    return {t.tensor_type.name for name, t in source._tensors.items()
            if name.startswith("blk.") and any(k in name for k in keys)}
