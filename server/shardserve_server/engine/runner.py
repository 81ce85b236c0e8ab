"""One forward pass of a step, as every TP rank runs it: the plan, its wire form, the runner.

A ForwardPlan says which tokens to run for which sequences (rows). Two layouts:

- padded (kind 1): tokens and positions [B, T] (right-padded), real tokens per row, the column
  whose logits are wanted, and where each row's decoding state lives (KV block table for a
  paged-KV family, state slot for a state-slot family: see models/spec.py);
- flat (kind 3, Llama over the paged cache): every token of the step in one row, tokens and
  positions [1, N], the R sequences' segments in order (prompt chunks first, then one token per
  decoding sequence), segment lengths [R], the flat index of each segment's last token [R] and
  the block tables [R, nb]. One forward then serves a step's prefill chunks and decodes
  together: every GEMM reads its weights once per step, with M = N rows, and no padding.

The leader builds plans; with TP > 1 it broadcasts each one as a single int64 tensor so that
every rank runs the identical forward in lockstep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardserve_sharding.models import PagedKVSpec, model_spec

from .paged_cache import PagedKVCache, StateSlotPool

_HEADER = 5  # kind, B, T, nb, R (sequences: B, or the segments of a flat plan)

FORWARD, STOP, KEEPALIVE, FLAT = 1, 0, 2, 3


@dataclass
class ForwardPlan:
    tokens: torch.Tensor  # [B, T] long ([1, N] flat)
    positions: torch.Tensor  # [B, T] long ([1, N] flat)
    num_new: torch.Tensor  # [R] long: real tokens per row / segment lengths (flat)
    logits_index: torch.Tensor  # [R] long: column per row / flat token index (flat)
    tables: torch.Tensor  # [R, nb] long: KV block tables (-1 padded), or [R, 1] state slots
    kind: int = FORWARD  # FORWARD, FLAT, STOP, KEEPALIVE (followers run nothing)
    decode_only: bool = False  # every row decodes one token (timing labels; not broadcast)

    @property
    def flat(self) -> bool:
        return self.kind == FLAT

    def pack(self) -> torch.Tensor:
        b, t = self.tokens.shape
        nb = self.tables.shape[1]
        r = self.num_new.shape[0]
        head = torch.tensor([self.kind, b, t, nb, r], dtype=torch.long)
        return torch.cat([head, self.tokens.reshape(-1), self.positions.reshape(-1),
                          self.num_new, self.logits_index, self.tables.reshape(-1)])

    @staticmethod
    def unpack(buf: torch.Tensor) -> ForwardPlan:
        kind, b, t, nb, r = (int(x) for x in buf[:_HEADER])
        o = _HEADER
        tokens = buf[o : o + b * t].view(b, t)
        o += b * t
        positions = buf[o : o + b * t].view(b, t)
        o += b * t
        num_new = buf[o : o + r]
        o += r
        logits_index = buf[o : o + r]
        o += r
        tables = buf[o : o + r * nb].view(r, nb)
        return ForwardPlan(tokens, positions, num_new, logits_index, tables, kind)

    @staticmethod
    def stop(kind: int = STOP) -> ForwardPlan:
        z = torch.zeros(0, 0, dtype=torch.long)
        e = torch.zeros(0, dtype=torch.long)  # (z[0] would raise: dimension 0 is empty)
        return ForwardPlan(z, z, e, e, z, kind=kind)

    @staticmethod
    def keepalive() -> ForwardPlan:
        """Sent by an idle leader so that waiting followers never hit the collective timeout."""
        return ForwardPlan.stop(kind=KEEPALIVE)


def broadcast_plan(plan: ForwardPlan | None, group=None) -> ForwardPlan:
    """Leader (plan given) sends, followers (None) receive; two broadcasts: size, then data."""
    if plan is not None:
        buf = plan.pack()
        size = torch.tensor([buf.numel()], dtype=torch.long)
        dist.broadcast(size, src=0, group=group)
        dist.broadcast(buf, src=0, group=group)
        return plan
    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src=0, group=group)
    buf = torch.empty(int(size), dtype=torch.long)
    dist.broadcast(buf, src=0, group=group)
    return ForwardPlan.unpack(buf)


@dataclass(frozen=True)
class CacheGeometry:
    """Size of a worker's decoding-state pool."""

    kv_cache_tokens: int
    """Tokens of KV cache (all sequences together); rounded down to whole blocks."""
    block_size: int = 16
    """Tokens per KV block."""
    max_slots: int = 256
    """State-slot families: most sequences with a state at once."""

    @property
    def num_blocks(self) -> int:
        return max(1, self.kv_cache_tokens // self.block_size)


_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes ModelRunner.forward hands on as they are (others: upcast to float32)."""


class ModelRunner:
    """Holds one rank's model and decoding-state pool and runs ForwardPlans."""

    def __init__(self, model: torch.nn.Module, geometry: CacheGeometry, dtype: torch.dtype):
        self.model, self.geometry, self.dtype = model, geometry, dtype
        self.family = model.family
        spec = model_spec(self.family).cache_spec(model)
        self.paged = isinstance(spec, PagedKVSpec)
        if self.paged:
            self.cache: PagedKVCache | StateSlotPool = PagedKVCache(
                n_layers=spec.n_layers, num_blocks=geometry.num_blocks,
                block_size=geometry.block_size, n_kv_heads=spec.n_kv_heads,
                head_dim=spec.head_dim, dtype=dtype,
            )
        else:
            self.cache = StateSlotPool(spec, max_slots=geometry.max_slots, dtype=dtype)
        self.forward_seconds = 0.0
        self.flat_batches = self.paged
        """This runner takes FLAT plans (the scheduler then builds one forward per step)."""

    @property
    def comm_seconds(self) -> float:
        comm = getattr(self.model, "tp_comm", None)
        return float(getattr(comm, "comm_seconds", 0.0))

    @torch.inference_mode()
    def forward(self, plan: ForwardPlan) -> torch.Tensor:
        """Logits [B, V] at each row's logits_index, in float32 or, for a bf16 / fp16 model,
        its dtype: GroupScheduler.process takes greedy rows' argmax from them as they are (the
        same ints) and upcasts only what sampling needs (the [32, 49152] upcast of every
        step was 1.4 ms on one thread)."""
        t0 = time.perf_counter()
        if plan.flat:
            self.cache.set_flat_step(plan.tables, plan.positions[0], plan.num_new)
            logits = self.model(plan.tokens, plan.positions, self.cache, plan.logits_index)
        else:  # a padded plan, over either kind of pool
            cache = self.cache.step(plan.tables, plan.positions, plan.num_new)
            logits = self.model(plan.tokens, plan.positions, cache, plan.logits_index)
            self.cache.end_step()
        self.forward_seconds += time.perf_counter() - t0
        return logits if logits.dtype in _LOGIT_DTYPES else logits.float()
