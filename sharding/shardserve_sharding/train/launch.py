"""Start a training run: under torchrun (RANK/WORLD_SIZE set) or by spawning its own ranks.

Spawned ranks are watched: when one dies (crash, kill) the others are stopped at once and the
run fails with TrainingFailed naming the rank, its exit code and the last complete checkpoint
(from which `--resume` continues).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

from .checkpoint import latest_checkpoint
from .trainer import TrainConfig, rank_main


class TrainingFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_main(cfg: TrainConfig, progress: bool) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from .trainer import RankTrainer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.pg_timeout_s))
    try:
        RankTrainer(cfg, rank, world).run(progress=progress)
    finally:
        dist.destroy_process_group()


def validate(cfg: TrainConfig) -> None:
    """Refuse a layout that cannot work before any process starts."""
    from ..partition import check_tp, stage_layers
    from .parallel_dims import ParallelDims
    from .trainer import model_config

    ParallelDims(cfg.dp, cfg.tp, cfg.pp)
    if cfg.batch_size % (cfg.dp * cfg.micro_batches):
        raise ValueError(f"batch_size {cfg.batch_size} must divide into dp {cfg.dp} x "
                         f"micro_batches {cfg.micro_batches}")
    mcfg = model_config(cfg, 512)  # the vocabulary never limits TP (it is padded)
    check_tp(cfg.family, mcfg, cfg.tp)
    stage_layers(mcfg.n_layers, cfg.pp)


def train(cfg: TrainConfig, progress: bool = True) -> None:
    validate(cfg)
    world = cfg.dp * cfg.tp * cfg.pp
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_main(cfg, progress)
    if world == 1:
        return rank_main(cfg, 0, 1, 0, progress)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(
            target=rank_main,
            args=(cfg, r, world, port, progress and r == 0),
            name=f"shardserve-train-rank{r}",
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    failed = None
    try:
        while any(p.is_alive() for p in procs):
            for r, p in enumerate(procs):
                if not p.is_alive() and p.exitcode != 0:
                    failed = (r, p.exitcode)
                    break
            if failed:
                break
            time.sleep(0.1)
        if failed is None:
            bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
            failed = bad[0] if bad else None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
    if failed is not None:
        ck = latest_checkpoint(cfg.out)
        where = f"last complete checkpoint: {ck}" if ck else "no complete checkpoint yet"
        raise TrainingFailed(
            f"training rank {failed[0]} exited with code {failed[1]}; the run was stopped "
            f"({where}; continue with --resume)"
        )
