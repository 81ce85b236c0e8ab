"""The KV block pool of one worker group: allocation, reference counts and prefix caching.

Blocks are fixed-size runs of KV slots (see paged_cache.py); a sequence's block table lists
its blocks in order. With prefix caching, every *full* block a sequence has computed is
registered under a key chaining (parent block's key, the block's token ids, a salt for anything
else that changes K/V), so a later request whose prompt starts with the same tokens takes those
blocks read-only instead of recomputing them (its prefill starts after them). Blocks are
reference-counted; a block nobody references stays cached (evictable) until an allocation
needs it: plain free blocks are used first, then cached ones least recently freed first. Keys
are Python hashes of int tuples (deterministic across processes); a hit is confirmed against
the block's stored tokens and parent, so a hash collision can never serve another prefix.

The pool lives with the scheduler (the group leader); every rank has a KV pool of the same
geometry, so block ids mean the same slots everywhere and only block tables travel.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ROOT_KEY = 0
"""Parent key of a sequence's first block."""


def block_key(parent: int, tokens: tuple[int, ...], salt: int = 0) -> int:
    """Key of a full block: chained over its parent so equal keys mean equal prefixes."""
    return hash((parent, salt, tokens))


def prefix_keys(ids: list[int], block_size: int, n_blocks: int, salt: int = 0,
                parent: int = ROOT_KEY) -> list[int]:
    """Keys of the first n_blocks full blocks of `ids` (which follow the block keyed
    `parent`; ROOT_KEY: ids start the sequence)."""
    keys = []
    for i in range(n_blocks):
        parent = block_key(parent, tuple(ids[i * block_size : (i + 1) * block_size]), salt)
        keys.append(parent)
    return keys


@dataclass
class _Meta:
    """What a cached block holds: its key, parent key and tokens (to confirm a hit)."""

    key: int
    parent: int
    tokens: tuple[int, ...]


class BlockAllocator:
    """Free list, reference counts and (optionally) the prefix cache of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False
                 ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # blocks holding nothing (a stack)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced (LRU)
        self._refs = [0] * num_blocks
        self._meta: list[_Meta | None] = [None] * num_blocks
        self._by_key: dict[int, int] = {}

    # ---- accounting
    @property
    def free_blocks(self) -> int:
        """Blocks an allocation may take now (evictable cached blocks included)."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (referenced or not)."""
        return len(self._by_key)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    # ---- allocation
    def allocate(self, n: int) -> list[int]:
        if n > self.free_blocks:
            raise MemoryError(f"KV cache exhausted: need {n} blocks, {self.free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                self._forget(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks are released tail first, so that a
        sequence's last blocks are evicted before the prefix others are likelier to share."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] < 0:
                raise RuntimeError(f"block {b} freed more often than taken")
            if self._refs[b] == 0:
                if self._meta[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend a block table in place so it holds `tokens` tokens."""
        need = self.blocks_for(tokens) - len(table)
        if need > 0:
            table.extend(self.allocate(need))

    # ---- prefix cache
    def lookup(self, ids: list[int], max_blocks: int, salt: int = 0) -> tuple[list[int], int]:
        """Blocks caching the longest prefix of `ids` (at most max_blocks full blocks), in
        order, and the key of the last one (ROOT_KEY if none); nothing is taken (see
        acquire)."""
        if not self.prefix_caching or max_blocks <= 0:
            return [], ROOT_KEY
        bs = self.block_size
        found, parent = [], ROOT_KEY
        for i in range(max_blocks):
            tokens = tuple(ids[i * bs : (i + 1) * bs])
            key = block_key(parent, tokens, salt)
            b = self._by_key.get(key)
            meta = self._meta[b] if b is not None else None
            if meta is None or meta.tokens != tokens or meta.parent != parent:
                break
            found.append(b)
            parent = key
        return found, parent

    def revived(self, blocks: list[int]) -> int:
        """How many of `blocks` nobody references now (taking them uses free space)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference to cached blocks found by lookup."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1

    def register(self, table: list[int], ids: list[int], done: int, parent: int,
                 salt: int = 0) -> tuple[int, int]:
        """Cache the full blocks table[done:] whose tokens `ids` (the sequence's tokens with
        computed K/V, at least) cover. `done` blocks are registered already, `parent` is the
        key of the last of them. Returns the new (done, parent). A block whose prefix another
        block caches already stays private (its key still chains the sequence on)."""
        if not self.prefix_caching:
            return done, parent
        bs = self.block_size
        full = min(len(table), len(ids) // bs)
        for i in range(done, full):
            tokens = tuple(ids[i * bs : (i + 1) * bs])
            key = block_key(parent, tokens, salt)
            b = table[i]
            if self._meta[b] is None and key not in self._by_key:
                self._meta[b] = _Meta(key, parent, tokens)
                self._by_key[key] = b
            parent = key
        return max(done, full), parent

    def _forget(self, b: int) -> None:
        meta = self._meta[b]
        if meta is not None and self._by_key.get(meta.key) == b:
            del self._by_key[meta.key]
        self._meta[b] = None

    def reset_prefix_cache(self) -> int:
        """Drop every unreferenced cached block (referenced ones stay until freed); returns
        how many were dropped."""
        n = len(self._evictable)
        for b in list(self._evictable):
            self._forget(b)
            self._free.append(b)
        self._evictable.clear()
        return n
