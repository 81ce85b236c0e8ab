"""Paged decoding state for continuous batching: a block allocator, a paged KV cache (Llama) and
a slot pool of convolution states (conv LM).

KV memory is a pool of fixed-size blocks, [n_layers, num_blocks * block_size, Hkv, D] per K and
V; each sequence owns a block table (its blocks in order), so memory is counted in tokens and a
sequence wastes less than one block. A step names, for every row, its block table, positions
and number of new tokens; writes go to the slots of those positions, reads gather the row's
blocks up to the longest position in the step. The allocator lives with the scheduler (the
group leader); every TP rank has a pool of the same geometry, so block ids mean the same slots
on every rank and only the block tables travel in the step broadcast.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Free list of KV blocks; counts in tokens for admission."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend a block table in place so it holds `tokens` tokens."""
        need = self.blocks_for(tokens) - len(table)
        if need > 0:
            table.extend(self.allocate(need))


class PagedKVCache:
    """The Llama cache contract of models/kv_cache.py over a block pool.

    K and V of a slot sit side by side ([L, slots, 2, Hkv, D]; `k` and `v` are views), so a
    layer reads a step's history with one gather. Everything that depends only on the step
    (write and read slots, the mask) is computed once in `set_step` and reused by every layer.
    """

    def __init__(
        self, *, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
        head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        slots = num_blocks * block_size
        self.kv = torch.zeros((n_layers, slots, 2, n_kv_heads, head_dim), dtype=dtype,
                              device=device)  # [L, slots, 2, Hkv, D]
        self.k = self.kv[:, :, 0]  # [L, slots, Hkv, D] (view)
        self.v = self.kv[:, :, 1]  # [L, slots, Hkv, D] (view)
        self.block_size = block_size
        self.device = device
        # additive mask dtype: fp32 for 16-bit caches (attention upcasts emulated bf16 to fp32;
        # elsewhere the mask is cast once per layer, a [B, 1, T, S] tensor)
        self._mask_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    def set_step(self, block_tables: torch.Tensor, positions: torch.Tensor,
                 num_new: torch.Tensor) -> None:
        """block_tables [B, nb] (long, -1 padded), positions [B, T], num_new [B]."""
        bs = self.block_size
        bsz, seqlen = positions.shape
        dev = positions.device
        if seqlen == 1:  # decode: a few Python ints are cheaper than tensor reductions
            pos = positions[:, 0].tolist()
            kv_len = max(pos) + 1
            same = min(pos) + 1 == kv_len
            all_valid = True
        else:
            kv_len = int(positions.max()) + 1
            same = False
            all_valid = bool((num_new == seqlen).all())
        tables = block_tables.clamp(min=0)
        last = tables.shape[1] - 1
        # write slots: padding columns (t >= num_new) are sent to a scratch slot they may spoil
        blk = torch.gather(tables, 1, (positions // bs).clamp(max=last))  # [B, T]
        self._write = (blk * bs + positions % bs).reshape(-1)  # [B*T]
        self._keep = None
        if not all_valid:  # never let padding overwrite another row's real tokens
            valid = torch.arange(seqlen, device=dev)[None, :] < num_new[:, None]  # [B, T]
            self._keep = valid.reshape(-1).nonzero().squeeze(1)  # [N]
            self._write = self._write[self._keep]
        keys = torch.arange(kv_len, device=dev)  # [S]
        rblk = torch.gather(tables, 1, (keys // bs).clamp(max=last).expand(bsz, -1))  # [B, S]
        self._read = (rblk * bs + keys % bs).reshape(-1)  # [B*S]
        self._shape = (bsz, kv_len)
        if same:  # one query per row, every row at the newest position: all keys visible
            self._mask = None
            return
        visible = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
        # additive float mask, built once per step (SDPA would convert a bool one every layer)
        self._mask = torch.zeros(visible.shape, dtype=self._mask_dtype, device=dev).masked_fill_(
            ~visible, float("-inf")).unsqueeze(1)  # [B, 1, T, S]

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        raise RuntimeError("PagedKVCache needs set_step(block_tables, positions, num_new)")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [B, Hkv, T, D] -> gathered k, v [B, Hkv, S, D] and mask [B, 1, T, S] or None."""
        bsz, hkv, seqlen, d = k.shape
        kf = k.transpose(1, 2).reshape(bsz * seqlen, hkv, d)  # [B*T, Hkv, D]
        vf = v.transpose(1, 2).reshape(bsz * seqlen, hkv, d)
        if self._keep is not None:
            kf, vf = kf[self._keep], vf[self._keep]  # [N, Hkv, D]
        pool = self.kv[layer]  # [slots, 2, Hkv, D]
        pool[:, 0].index_copy_(0, self._write, kf)
        pool[:, 1].index_copy_(0, self._write, vf)
        b, s = self._shape
        kv = pool.index_select(0, self._read).view(b, s, 2, hkv, d)  # [B, S, 2, Hkv, D]
        kk = kv[:, :, 0].transpose(1, 2)  # [B, Hkv, S, D]
        vv = kv[:, :, 1].transpose(1, 2)  # [B, Hkv, S, D]
        return kk, vv, self._mask


class ConvStatePool:
    """Convolution states of up to max_slots sequences; a step gathers its rows' states into a
    ConvState, the model advances it, and end_step scatters them back. Slot ids are handed out
    by the scheduler (see SlotAllocator) and travel in the plan like KV block tables."""

    def __init__(self, *, n_layers: int, max_slots: int, dim: int, kernel_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        from shardserve_sharding.models.convlm import ConvState

        self._cls = ConvState
        self.pool = torch.zeros(n_layers, max_slots, dim, kernel_size - 1, dtype=dtype,
                                device=device)  # [L, slots, dim, K-1]
        self.n_layers, self.dim, self.kernel_size = n_layers, dim, kernel_size
        self._slots: torch.Tensor | None = None
        self.state = None

    def set_step(self, slots: torch.Tensor, positions: torch.Tensor, num_new: torch.Tensor):
        """slots [B] long; a row starting at position 0 starts from a zero state."""
        self._slots = slots
        rows = self.pool.index_select(1, slots)  # [L, B, dim, K-1]
        fresh = positions[:, 0] == 0  # [B]
        if bool(fresh.any()):
            rows[:, fresh] = 0
        state = self._cls.from_tensor(rows)
        self.state = state
        state.begin_step(positions, num_new)
        return state

    def end_step(self) -> None:
        self.pool.index_copy_(1, self._slots, self.state.state)
