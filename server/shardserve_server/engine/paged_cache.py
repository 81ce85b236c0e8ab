"""Paged decoding state for continuous batching: a paged KV cache (PagedKVSpec families) and a
slot pool of per-sequence states (StateSlotSpec families: conv windows, recurrent h/c); the
block allocator and prefix cache are in block_pool.py.

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

from shardserve_sharding.models import StateSlotSpec

from . import decode_attention
from .attention_op import activate


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
        self._flat = False
        cpu = torch.device(device).type == "cpu"
        self._step_kernel = decode_attention.step_kernel() if cpu else None
        """The C++ decode attention's whole-step call (K/V writes + decode rows read in place
        from the pool: decode_attention.py), or None: index_copy_, gathers + SDPA."""
        self._qkv_kernel = decode_attention.qkv_kernel() if cpu else None
        """The same on the fused QKV output itself (attend_qkv), or None."""
        self._no_rows = (torch.empty(0, 1, dtype=torch.long), torch.empty(0, dtype=torch.long))

    def set_step(self, block_tables: torch.Tensor, positions: torch.Tensor,
                 num_new: torch.Tensor) -> None:
        """block_tables [B, nb] (long, -1 padded), positions [B, T], num_new [B]."""
        activate(self)
        self._flat = False
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

    def step(self, tables: torch.Tensor, positions: torch.Tensor,
             num_new: torch.Tensor) -> PagedKVCache:
        """The pool contract shared with StateSlotPool: prepare a padded step (tables [B, nb])
        and return what the model takes as its cache, this pool itself."""
        self.set_step(tables, positions, num_new)
        return self

    def end_step(self) -> None:
        """Nothing to write back: the model wrote its K/V into the pool."""

    def set_flat_step(self, block_tables: torch.Tensor, positions: torch.Tensor,
                      seg_lens: torch.Tensor) -> None:
        """A flat step (runner.FLAT): block_tables [R, nb] (-1 padded), positions [N], seg_lens
        [R]; segments of more than one token (prompt chunks) come first, then the decoding
        sequences, one token each. Computes every token's write slot, each chunk's read slots
        and mask, and the decode rows' batched read slots and mask."""
        activate(self)
        self._flat = True
        bs, dev = self.block_size, positions.device
        lens = seg_lens.tolist()
        tables = block_tables.clamp(min=0)  # [R, nb]
        last = tables.shape[1] - 1
        owner = torch.repeat_interleave(torch.arange(len(lens), device=dev), seg_lens)  # [N]
        blk = tables[owner, (positions // bs).clamp(max=last)]  # [N]
        self._write = blk * bs + positions % bs  # [N]
        n_dec = 0
        while n_dec < len(lens) and lens[len(lens) - 1 - n_dec] == 1:
            n_dec += 1
        n_chunks = len(lens) - n_dec
        starts = positions[torch.tensor([0, *lens[:-1]], device=dev).cumsum(0)].tolist()  # [R]
        self._chunks = []  # (first token, tokens, read slots [S], mask [1, 1, n, S] | None)
        o = 0
        for i in range(n_chunks):
            n, start = lens[i], starts[i]
            keys = torch.arange(start + n, device=dev)  # [S]
            read = tables[i, (keys // bs).clamp(max=last)] * bs + keys % bs  # [S]
            mask = None  # a chunk from position 0 is plain causal attention
            if start:
                visible = keys[None, :] <= torch.arange(start, start + n, device=dev)[:, None]
                mask = torch.zeros(visible.shape, dtype=self._mask_dtype, device=dev
                                   ).masked_fill_(~visible, float("-inf"))[None, None]
            self._chunks.append((o, n, read, mask))
            o += n
        self._dec_from, self._dec_rows = o, n_dec
        self._dec_lens = None
        if n_dec and self._step_kernel is not None:
            # the kernel reads the rows' blocks in place: tables and key counts are all it needs
            self._dec_tables = block_tables[n_chunks:].contiguous()  # [Dn, nb]
            self._dec_lens = torch.tensor(starts[n_chunks:], device=dev) + 1  # [Dn]
        elif n_dec:
            # decode rows read whole blocks (16x fewer, 16x longer copies than slot by slot:
            # 2x faster for SmolLM2 at 32 rows); a row's table is padded with its own last
            # block, and keys past its position are masked
            pos = starts[n_chunks:]
            nblk = (max(pos) + 1 + bs - 1) // bs
            dt = block_tables[n_chunks:, :nblk]  # [Dn, nblk] (-1 padded)
            last_valid = dt.gather(1, ((dt >= 0).sum(1, keepdim=True) - 1).clamp(min=0))
            self._dec_blocks = torch.where(dt >= 0, dt, last_valid).reshape(-1)  # [Dn*nblk]
            keys = torch.arange(nblk * bs, device=dev)  # [S]
            visible = keys[None, :] <= torch.tensor(pos, device=dev)[:, None]  # [Dn, S]
            self._dec_mask = None  # every row at the last key: all visible
            if not bool(visible.all()):
                self._dec_mask = torch.zeros(visible.shape, dtype=self._mask_dtype,
                                             device=dev).masked_fill_(
                    ~visible, float("-inf"))[:, None, None]  # [Dn, 1, 1, S]

    attends = True
    """The model hands this cache the whole attention step (`attend`), so a compiled forward
    sees one opaque op per layer instead of the cache's writes and gathers."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], k, v [B, Hkv, T, D] -> [B, H, T, D] through the opaque op (which
        reads this cache: set_step made it the active one); eager forwards call the body
        directly (the op's Python dispatch costs ~30 us a layer)."""
        if torch.compiler.is_compiling():
            return torch.ops.shardserve.paged_attention(q, k, v, layer)
        return self.run_attention(layer, q, k, v)

    def run_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
        """The op's body: write k, v into the pool, attend over each row's history."""
        from shardserve_sharding.models.llama import attention

        gqa = q.shape[1] != k.shape[1]
        if not self._flat:
            k_all, v_all, mask = self.update(layer, k, v)  # [B, Hkv, S, D] x2, [B, 1, T, S]
            return attention(q, k_all, v_all, mask, enable_gqa=gqa)  # [B, H, T, D]
        _, hkv, _, d = k.shape
        pool = self.kv[layer]  # [slots, 2, Hkv, D]
        if self._step_kernel is not None:
            dtype = q.dtype
            if dtype != pool.dtype or k.dtype != pool.dtype or v.dtype != pool.dtype:
                q, k, v = (t.to(pool.dtype) for t in (q, k, v))  # the kernel's one dtype
            return self._attend_step(pool, q, k, v).to(dtype)
        kv = _adjacent_kv(k, v)
        if kv is not None:  # one copy of each token's K and V heads into its slot
            pool.index_copy_(0, self._write, kv)  # [N, 2, Hkv, D] in
        else:
            pool[:, 0].index_copy_(0, self._write, k[0].transpose(0, 1))  # [N, Hkv, D] in
            pool[:, 1].index_copy_(0, self._write, v[0].transpose(0, 1))
        outs = []
        for o, n, read, mask in self._chunks:
            kv = pool.index_select(0, read)  # [S, 2, Hkv, D]
            kk = kv[:, 0].transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
            vv = kv[:, 1].transpose(0, 1).unsqueeze(0)
            outs.append(attention(q[:, :, o : o + n], kk, vv, mask, is_causal=mask is None,
                                  enable_gqa=gqa))  # [1, H, n, D]
        if self._dec_rows:
            rows = self._dec_rows
            qd = q[0, :, self._dec_from :].transpose(0, 1).unsqueeze(2)  # [Dn, H, 1, D]
            blocks = pool.view(-1, self.block_size * 2 * hkv * d)  # [num_blocks, bs*2*Hkv*D]
            kv = blocks.index_select(0, self._dec_blocks).view(rows, -1, 2, hkv, d)  # [Dn,S,..]
            kk = kv[:, :, 0].transpose(1, 2)  # [Dn, Hkv, S, D]
            vv = kv[:, :, 1].transpose(1, 2)
            od = attention(qd, kk, vv, self._dec_mask, enable_gqa=gqa)  # [Dn, H, 1, D]
            outs.append(od[:, :, 0].transpose(0, 1).unsqueeze(0))  # [1, H, Dn, D]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, H, N, D]

    def attend_qkv(self, layer: int, qkv: torch.Tensor) -> torch.Tensor | None:
        """A flat step without prompt chunks (decode rows only) in one kernel call on the fused
        QKV projection's output: qkv [N, (H + 2 Hkv) D], rotated -> attention output [N, H D]
        (K/V written into the pool). None where the step needs the general path (`attend`):
        prompt chunks, a padded step, no kernel, another dtype than the pool's."""
        if (not self._flat or self._chunks or self._qkv_kernel is None
                or qkv.dtype != self.kv.dtype):
            return None
        tables, lens = ((self._dec_tables, self._dec_lens) if self._dec_lens is not None
                        else self._no_rows)
        d = self.kv.shape[-1]
        return self._qkv_kernel(qkv, self.kv[layer], self._write, tables, lens,
                                self.block_size, d ** -0.5)  # [N, H D]

    def _attend_step(self, pool: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """A flat step's attention with one kernel call for the K/V writes and the decode rows
        (q, k, v read in place from the QKV projection's output, the decode rows written into
        their rows of one output buffer); prompt chunks through SDPA into theirs. q [1, H, N,
        D], k, v [1, Hkv, N, D] -> [1, H, N, D] (a view of a contiguous [1, N, H, D], so the
        model's transpose back and reshape copy nothing)."""
        from shardserve_sharding.models.llama import attention

        _, h, n, d = q.shape
        out = torch.empty(n, h, d, dtype=q.dtype, device=q.device)  # [N, H, D]
        tables, lens = ((self._dec_tables, self._dec_lens) if self._dec_lens is not None
                        else self._no_rows)
        self._step_kernel(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                          pool, self._write, tables, lens, out, self.block_size, d ** -0.5)
        gqa = h != k.shape[1]
        for o, m, read, mask in self._chunks:
            kv = pool.index_select(0, read)  # [S, 2, Hkv, D]
            kk = kv[:, 0].transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
            vv = kv[:, 1].transpose(0, 1).unsqueeze(0)
            out[o : o + m] = attention(q[:, :, o : o + m], kk, vv, mask, is_causal=mask is None,
                                       enable_gqa=gqa)[0].transpose(0, 1)  # [m, H, D]
        return out.unsqueeze(0).transpose(1, 2)  # [1, H, N, D]

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


def _adjacent_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k, v [1, Hkv, N, D] as one [N, 2, Hkv, D] view when each token's V heads follow its K
    heads in memory, as in the fused QKV output the Llama model rotates in place (models/
    fused_ops.py): that is a pool slot's layout, so one index_copy_ writes both. None
    otherwise (e.g. k is a rotated copy)."""
    _, hkv, n, d = k.shape
    if (k.dtype != v.dtype or k.stride(3) != 1 or k.stride(1) != d or k.stride() != v.stride()
            or k.stride(2) < 2 * hkv * d
            or v.data_ptr() - k.data_ptr() != hkv * d * k.element_size()
            or v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()):
        return None
    return k.as_strided((n, 2, hkv, d), (k.stride(2), hkv * d, d, 1))  # [N, 2, Hkv, D]


class StateSlotPool:
    """Per-sequence states of up to max_slots sequences (a model's StateSlotSpec); a step
    gathers its rows' states into the model's state class, the model advances it, and end_step
    scatters them back. Slot ids are handed out by the scheduler (see SlotAllocator) and travel
    in the plan like KV block tables."""

    def __init__(self, spec: StateSlotSpec, *, max_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self._cls = spec.state_cls
        self.pool = torch.zeros(spec.n_layers, max_slots, *spec.state_shape, dtype=dtype,
                                device=device)  # [L, slots, *state_shape]
        self.spec = spec
        self._slots: torch.Tensor | None = None
        self.state = None

    def set_step(self, slots: torch.Tensor, positions: torch.Tensor, num_new: torch.Tensor):
        """slots [B] long; a row starting at position 0 starts from a zero state."""
        self._slots = slots
        rows = self.pool.index_select(1, slots)  # [L, B, *state_shape]
        fresh = positions[:, 0] == 0  # [B]
        if bool(fresh.any()):
            rows[:, fresh] = 0
        state = self._cls.from_tensor(rows)
        self.state = state
        state.begin_step(positions, num_new)
        return state

    def step(self, tables: torch.Tensor, positions: torch.Tensor, num_new: torch.Tensor):
        """The pool contract shared with PagedKVCache: tables [B, 1] holds each row's slot;
        returns the rows' state for the model (end_step writes it back)."""
        return self.set_step(tables[:, 0], positions, num_new)

    def end_step(self) -> None:
        """Scatter the advanced states back into their slots."""
        self.pool.index_copy_(1, self._slots, self.state.state)
