"""Load one TP rank of a model from a shardserve checkpoint at any layout.

Fast path: the checkpoint is already cut at this TP with PP=1, and the rank reads only its own
file. Otherwise each tensor's slice for this rank is read from the files that hold it (slice
reads), so any checkpoint serves at any valid TP with no offline step. A quantized
checkpoint's weights are wired in as int8 / int4 kernel modules (quant/apply.py); its integer
tensors are never cast to `dtype` (their scales are).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint.io import read_rank_file
from .checkpoint.manifest import CheckpointError
from .checkpoint.source import ShardserveSource
from .materialize import materialize
from .partition import TPGeometry, check_tp, local_shape, shard_spec
from .split_table import split_kind
from .tp.comm import Comm


def read_rank_state(source: ShardserveSource, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's local tensors, from its own file or by slice reads of another layout."""
    layout = source.manifest.layout
    if layout.tp == tp and layout.pp == 1:
        path = source.root / source.files[(rank, 0)]
        state = read_rank_file(path)
        expected = set(source.manifest.tensors)
        if set(state) != expected:
            missing = sorted(expected - set(state))[:5]
            raise CheckpointError(f"{path}: tensors missing {missing} or unexpected ones present")
        for name, shape in source.names_and_shapes():
            want = local_shape(shape, source._spec(name, rank))
            if tuple(state[name].shape) != want:
                raise CheckpointError(
                    f"{path}: {name} is {list(state[name].shape)}, "
                    f"layout tp={tp} needs {list(want)}"
                )
        return state
    geo = TPGeometry.of(source.family, source.config)
    state = {}
    for name, shape in source.names_and_shapes():
        spec = shard_spec(split_kind(source.family, name), shape, geo, tp, rank)
        state[name] = source.read_local(name, spec)
    return state


def load_sharded_model(
    directory: str | os.PathLike[str],
    comm: Comm,
    *,
    dtype: torch.dtype = torch.float32,
    verify_hashes: bool = True,
) -> torch.nn.Module:
    """The model for rank comm.rank of comm.world_size, with only its slices in memory."""
    source = ShardserveSource(Path(directory), verify_hashes=verify_hashes)
    check_tp(source.family, source.config, comm.world_size)
    if source.quant is not None:
        from .quant.apply import check_quantized_tp

        check_quantized_tp(source.family, source.config, source.names_and_shapes(), source.quant,
                           comm.world_size)
    state = read_rank_state(source, comm.world_size, comm.rank)
    return materialize(source.family, source.config, state, dtype=dtype, comm=comm,
                       quant=source.quant, where=source.root)
