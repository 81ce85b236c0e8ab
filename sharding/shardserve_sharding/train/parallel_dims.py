"""Degrees of parallelism as one validated object, and the process groups they imply.

Rank order: tensor-parallel ranks are adjacent (fastest), then pipeline stages, then data
parallel replicas: rank = (dp * pp + pp_rank) * tp + tp_rank, as in Megatron-LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """DP x TP x PP degrees; their product is the world size."""

    dp: int = 1
    """Data-parallel replicas (gradients all-reduced)."""
    tp: int = 1
    """Tensor-parallel ranks per stage (split table)."""
    pp: int = 1
    """Pipeline stages (contiguous layer ranges)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(
                f"dp {self.dp} x tp {self.tp} x pp {self.pp} = {self.world_size} "
                f"ranks, but the world has {world_size}"
            )

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        pp_rank = (rank // self.tp) % self.pp
        return rank // (self.tp * self.pp), pp_rank, tp_rank

    def rank(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank


@dataclass
class Groups:
    """This rank's process groups (None where the degree is 1)."""

    tp: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    model: dist.ProcessGroup | None  # all tp x pp ranks of this data-parallel replica
    embed: dist.ProcessGroup | None  # first and last stage, same tp rank (tied embeddings)


def build_groups(dims: ParallelDims, rank: int) -> Groups:
    """Create every group on every rank (new_group must be called identically everywhere)."""
    d, p, t = dims.coords(rank)
    mine: dict[str, dist.ProcessGroup | None] = {
        "tp": None,
        "dp": None,
        "model": None,
        "embed": None,
    }
    for dd in range(dims.dp):
        for pp in range(dims.pp):
            ranks = [dims.rank(dd, pp, tt) for tt in range(dims.tp)]
            g = dist.new_group(ranks)
            if (dd, pp) == (d, p):
                mine["tp"] = g
    for pp in range(dims.pp):
        for tt in range(dims.tp):
            ranks = [dims.rank(dd, pp, tt) for dd in range(dims.dp)]
            g = dist.new_group(ranks)
            if (pp, tt) == (p, t):
                mine["dp"] = g
    for dd in range(dims.dp):
        ranks = [dims.rank(dd, pp, tt) for pp in range(dims.pp) for tt in range(dims.tp)]
        g = dist.new_group(ranks)
        if dd == d:
            mine["model"] = g
    for dd in range(dims.dp):
        for tt in range(dims.tp):
            ranks = sorted({dims.rank(dd, 0, tt), dims.rank(dd, dims.pp - 1, tt)})
            g = dist.new_group(ranks)
            if dd == d and tt == t:
                mine["embed"] = g
    return Groups(
        tp=mine["tp"] if dims.tp > 1 else None,
        dp=mine["dp"] if dims.dp > 1 else None,
        model=mine["model"] if dims.tp * dims.pp > 1 else None,
        embed=mine["embed"] if dims.pp > 1 else None,
    )
