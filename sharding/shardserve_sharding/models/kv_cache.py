"""Dense per-sequence KV cache for the Llama family (one row per sequence, max_len slots).

Each step writes the new keys and values at their absolute positions and returns the cache
slice up to the longest position in the step plus an additive float mask (0 where key
position <= query position, -inf elsewhere; None when every key is visible). Right-padding
columns of a ragged prefill write past a row's last real token; those slots are masked from
real queries and overwritten by the next real token, so they never leak.
"""

from __future__ import annotations

import torch


class DenseKVCache:
    """KV cache [n_layers, B, Hkv, max_len, D] with per-step write indices and mask."""

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, D]
        self.max_len = max_len
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._write: torch.Tensor | None = None
        self._kv_len = 0
        self._contiguous_from: int | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        """positions [B, T] long; num_new [B] long (unused: padding writes are harmless)."""
        del num_new
        bsz, seqlen = positions.shape
        if bsz != self.batch_size:
            raise ValueError(f"step has {bsz} rows, cache has {self.batch_size}")
        dev = positions.device
        if seqlen == 1:  # decode: a handful of ints, cheaper in Python than as tensor ops
            pos = positions[:, 0].tolist()
            start, kv_len = min(pos), max(pos) + 1
            same = start + 1 == kv_len
        else:
            kv_len = int(positions.max()) + 1
            start = int(positions[0, 0])
            steps = torch.arange(start, start + seqlen, device=dev)
            same = bool((positions == steps[None, :]).all())
        if kv_len > self.max_len:
            raise ValueError(f"position {kv_len - 1} exceeds cache length {self.max_len}")
        self._kv_len = kv_len
        self._pos = positions
        # All rows write the same contiguous range: a slice copy beats an index_put.
        self._contiguous_from = start if same else None
        self._write = None
        if same and seqlen == 1:
            self._mask = None  # one query per row at the newest position: every key is visible
            return
        keys = torch.arange(kv_len, device=dev)
        rows = positions[:1] if same else positions  # identical rows share one mask row
        visible = keys[None, None, :] <= rows[:, :, None]  # [B or 1, T, S]
        # Additive float mask, built once per step (SDPA would convert a bool one every layer).
        self._mask = torch.zeros(visible.shape, dtype=self.k.dtype, device=dev).masked_fill_(
            ~visible, float("-inf")
        ).unsqueeze(1)  # [B or 1, 1, T, S]
        if seqlen == 1:
            # Ragged decode: one flat slot per (row, kv head) in a layer's [B * Hkv * max_len, D].
            hkv = self.k.shape[2]
            slots = torch.arange(bsz * hkv, device=dev).view(bsz, hkv) * self.max_len
            self._write = (slots + positions).reshape(-1)  # [B * Hkv]
        else:
            self._rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, seqlen)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k, v [B, Hkv, T, D] -> cache k, v [B, Hkv, S, D] and mask [B, 1, T, S] (or None)."""
        kc, vc = self.k[layer], self.v[layer]  # [B, Hkv, max_len, D]
        start = self._contiguous_from
        if start is not None:
            kc[:, :, start : start + k.shape[2]] = k
            vc[:, :, start : start + v.shape[2]] = v
        elif self._write is not None:
            d = k.shape[-1]
            kc.view(-1, d).index_copy_(0, self._write, k.reshape(-1, d))  # [B * Hkv, D] rows
            vc.view(-1, d).index_copy_(0, self._write, v.reshape(-1, d))
        else:
            kc[self._rows, :, self._pos] = k.transpose(1, 2)  # index [B, T] -> [B, T, Hkv, D]
            vc[self._rows, :, self._pos] = v.transpose(1, 2)
        s = self._kv_len
        return kc[:, :, :s], vc[:, :, :s], self._mask

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
