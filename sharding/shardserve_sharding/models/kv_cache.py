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
        self.defer_writes = False
        """Decode steps leave the cache untouched during the forward: update() returns the
        cached keys with the new ones appended, and the new keys of all layers are written in
        one scatter when the next step begins (or on select). A forward then only reads the
        cache, which lets torch.compile capture it without copying the whole cache each step."""
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._write: torch.Tensor | None = None
        self._kv_len = 0
        self._contiguous_from: int | None = None
        self._deferred = False
        self._new: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, k, v) this step
        self._commit: torch.Tensor | None = None  # [L * B * Hkv] flat slots of self._new

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        """positions [B, T] long; num_new [B] long (unused: padding writes are harmless)."""
        del num_new
        self._flush()
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
        self._deferred = seqlen == 1 and self.defer_writes
        if self._deferred:
            self._begin_deferred(positions, same)
            return
        if same and seqlen == 1:
            self._mask = None  # one query per row at the newest position: every key is visible
            return
        keys = torch.arange(kv_len, device=dev)
        rows = positions[:1] if same else positions  # identical rows share one mask row
        self._mask = self._additive(keys[None, None, :] <= rows[:, :, None])  # [B or 1,1,T,S]
        if seqlen == 1:
            # Ragged decode: one flat slot per (row, kv head) in a layer's [B * Hkv * max_len, D].
            self._write = self._slots(positions, 1)  # [B * Hkv]
        else:
            self._rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, seqlen)

    def _begin_deferred(self, positions: torch.Tensor, same: bool) -> None:
        """Decode with deferred writes: keys [0, past) come from the cache, then the new one."""
        past = self._kv_len - 1  # the longest row's position: every row's cached keys fit
        if same:
            self._mask = None
        else:
            keys = torch.arange(past + 1, device=positions.device)
            # a row at position p sees its cached keys < p and the appended column `past`
            visible = (keys[None, :] < positions) | (keys[None, :] == past)  # [B, S]
            self._mask = self._additive(visible[:, None, :])  # [B, 1, 1, S]
        self._commit = self._slots(positions, self.k.shape[0])  # [L * B * Hkv]

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """bool [B, T, S] -> additive float mask [B, 1, T, S], built once per step (SDPA would
        convert a bool mask in every layer)."""
        mask = torch.zeros(visible.shape, dtype=self.k.dtype, device=visible.device)
        return mask.masked_fill_(~visible, float("-inf")).unsqueeze(1)

    def _slots(self, positions: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Flat row indices into k.view(-1, D) of position[b] for (layer, b, kv head), the first
        n_layers layers, in that order: [n_layers * B * Hkv]."""
        bsz, hkv = positions.shape[0], self.k.shape[2]
        base = torch.arange(n_layers * bsz * hkv, device=positions.device) * self.max_len
        return (base.view(n_layers, bsz, hkv) + positions.view(1, bsz, 1)).reshape(-1)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k, v [B, Hkv, T, D] -> cache k, v [B, Hkv, S, D] and mask [B, 1, T, S] (or None)."""
        kc, vc = self.k[layer], self.v[layer]  # [B, Hkv, max_len, D]
        if self._deferred:
            self._new.append((layer, k, v))
            past = self._kv_len - 1
            k_all = torch.cat([kc[:, :, :past], k], dim=2)  # [B, Hkv, past + 1, D]
            v_all = torch.cat([vc[:, :, :past], v], dim=2)
            return k_all, v_all, self._mask
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

    def _flush(self) -> None:
        """Write the deferred keys and values of the last step (all layers at once)."""
        if not self._new:
            return
        new, self._new = self._new, []
        d, n_layers = self.k.shape[-1], self.k.shape[0]
        kf, vf = self.k.view(-1, d), self.v.view(-1, d)  # [L * B * Hkv * max_len, D]
        if [layer for layer, _, _ in new] == list(range(n_layers)):
            ks = torch.stack([k for _, k, _ in new])  # [L, B, Hkv, 1, D]
            vs = torch.stack([v for _, _, v in new])
            kf.index_copy_(0, self._commit, ks.reshape(-1, d).to(kf.dtype))
            vf.index_copy_(0, self._commit, vs.reshape(-1, d).to(vf.dtype))
            return
        per_layer = self._commit.view(n_layers, -1)  # [L, B * Hkv]
        for layer, k, v in new:
            kf.index_copy_(0, per_layer[layer], k.reshape(-1, d).to(kf.dtype))
            vf.index_copy_(0, per_layer[layer], v.reshape(-1, d).to(vf.dtype))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order."""
        self._flush()
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
