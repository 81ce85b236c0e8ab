"""Collectives for tensor parallelism: torch.distributed groups, or threads in one process.

ProcessGroupComm wraps a real torch.distributed group (gloo on CPU, NCCL on GPU).
ThreadGroup runs N ranks as N threads of one process with the same semantics (sum all-reduce,
all-gather along the last dimension) so that many TP configurations can be checked quickly in
tests and by `reshard --verify`; torch kernels release the GIL, so the ranks really overlap.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch
import torch.distributed as dist


class Comm(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of t over ranks (returned; t may be modified in place)."""

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's t along the last dimension, in rank order."""


class ProcessGroupComm:
    """Collectives over a torch.distributed process group; times each call (comm_seconds)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.comm_seconds = 0.0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        t0 = time.perf_counter()
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        self.comm_seconds += time.perf_counter() - t0
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        t0 = time.perf_counter()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        self.comm_seconds += time.perf_counter() - t0
        return torch.cat(parts, dim=-1)


class ThreadGroup:
    """Shared state for N in-process ranks; comm(rank) gives each thread its Comm."""

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def _exchange(self, rank: int, t: torch.Tensor, combine) -> torch.Tensor:
        self._slots[rank] = t
        self._barrier.wait()
        out = combine([s for s in self._slots if s is not None])
        self._barrier.wait()  # everyone has read before anyone writes the next round
        return out


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.comm_seconds = 0.0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self.group._exchange(self.rank, t, _ordered_sum)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self.group._exchange(self.rank, t, lambda parts: torch.cat(parts, dim=-1))


def _ordered_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].clone()
    for p in parts[1:]:  # same order on every rank: bitwise identical sums
        out += p
    return out


def run_ranks(world_size: int, fn, *args):
    """Run fn(comm, rank, *args) on world_size threads; returns the per-rank results in order."""
    group = ThreadGroup(world_size)
    results: list[object] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(group.comm(rank), rank, *args)
        except BaseException as e:  # surface the first failure, unblock the others
            errors.append(e)
            group._barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return results
