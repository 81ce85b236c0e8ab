"""`torch_threads(n)`: torch's intra-op thread count set to n inside the block and restored
after it, for the tests that run a kernel at a given thread count or keep tiny matmuls on one
thread (spinning OpenMP workers slow small parallel regions tenfold on a shared machine)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
