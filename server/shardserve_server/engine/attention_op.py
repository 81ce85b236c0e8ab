"""The paged attention of one layer as one opaque torch op, for compiled forwards.

A compiled model (torch.compile, inductor) must not trace the KV pool: writing new keys into a
pool the graph received as input makes inductor copy the whole pool back every step (hundreds
of MB). As in vLLM v1, the attention of a layer is a custom op whose only inputs are the step's
q, k, v and the layer index; the op finds the step's cache (block tables, write/read slots,
mask: everything `PagedKVCache.set_step` computed) in a module-level slot that the runner fills
before each forward. The compiler sees a pure function [B, H, T, D] -> [B, H, T, D] and fuses
everything around it; the cache writes stay eager, in place, inside the op.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_ACTIVE = threading.local()
"""The PagedKVCache of the forward running on this thread (set by `activate`)."""


def activate(cache: Any) -> None:
    """Make `cache` the one the op reads and writes, until the next call (one per step)."""
    _ACTIVE.cache = cache


@torch.library.custom_op("shardserve::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    layer: int) -> torch.Tensor:
    """q [B, H, T, D], this step's k, v [B, Hkv, T, D] -> attention output [B, H, T, D]; writes
    k, v into the active cache's pool for `layer` (a side effect the compiler never sees)."""
    cache = getattr(_ACTIVE, "cache", None)
    if cache is None:
        raise RuntimeError("shardserve::paged_attention called outside a paged forward")
    return cache.run_attention(layer, q, k, v).contiguous()  # never a view of an input


@paged_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
