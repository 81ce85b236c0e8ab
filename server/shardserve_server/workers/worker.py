"""Entry point of one shard-worker process (one TP rank of a worker group).

Every rank joins the group's torch.distributed process group (gloo on CPU, NCCL where CUDA is
available), loads only its own slice of the checkpoint (its rank file, or slice reads of any
other layout), and builds its KV-cache pool. Rank 0, the leader, also runs the group's
scheduler: it takes requests from the front end over a pipe, plans each step, broadcasts the
plan, samples from the gathered logits and streams token events back. Followers loop on
broadcast plans. A collective that waits longer than the process-group timeout raises, so a
dead or hung rank ends the whole group within seconds; the front end then restarts it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..engine import defaults
from .protocol import Fatal


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs (sent to it at spawn)."""

    model_dir: str
    """shardserve checkpoint (any layout)."""
    tp: int = 1
    """Ranks in the group."""
    dtype: str = "float32"
    """float32 or bfloat16."""
    threads: int = 1
    """torch (or ONNX Runtime) intra-op threads per rank."""
    spin: bool = False
    """ONNX Runtime only: intra-op threads busy-wait between kernels (faster small GEMMs);
    for replicas whose threads have cores to themselves."""
    master_port: int = 0
    """TCP port of the group's rendezvous on 127.0.0.1 (TP > 1)."""
    pg_timeout_s: float = 10.0
    """A collective waiting longer than this fails the group."""
    kv_cache_tokens: int = defaults.KV_CACHE_TOKENS
    """KV-cache budget of the group, in tokens."""
    block_size: int = defaults.BLOCK_SIZE
    max_batch_size: int = defaults.MAX_BATCH_SIZE
    max_prefill_tokens: int = defaults.MAX_PREFILL_TOKENS
    prefix_caching: bool = True
    """Share the KV blocks of equal prompt prefixes between requests (Llama family)."""
    backend: str = "torch"
    """'torch' (shard workers over a checkpoint) or 'onnx' (ONNX Runtime over an export)."""
    warmup: bool = True
    """Run one small step before reporting ready."""
    verify_hashes: bool = True
    """Check the checkpoint's sha256s before loading (the front end has usually done it: the
    stamp file then makes this a stat per file)."""
    nice: int = 10
    """Added to the rank's niceness at start: with the cores busy, the front end (admission,
    refusals, streaming) then runs ahead of the forward passes, which get every cycle it does
    not use (loadtest/results/overload.md: refusal p99 under 10x overload)."""
    rendezvous: str = ""
    """HOST:PORT of a multi-host group's TCPStore (workers/rendezvous.py); empty: every rank
    runs on this host and rank 0 hosts the rendezvous on 127.0.0.1:master_port."""
    local_ranks: int = 0
    """Multi-host groups: ranks 0..local_ranks-1 run on the front end's host, the others join
    from `shardserve worker --join` (0: all ranks are local)."""
    generation: int = 0
    """Multi-host groups: the start this config belongs to (set by the rendezvous)."""
    manifest_sha256: str = ""
    """Multi-host groups: fingerprint of the front end's manifest; a rank whose checkpoint
    differs refuses to join."""


def _init_group(cfg: WorkerConfig, rank: int) -> Any:
    from shardserve_sharding.tp.comm import ProcessGroupComm, ThreadGroup

    if cfg.tp == 1:
        return ThreadGroup(1).comm(0)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if cfg.rendezvous:
        from .rendezvous import check_in, client_store

        base = client_store(cfg.rendezvous, max(cfg.pg_timeout_s, 30.0))
        store = dist.PrefixStore(f"g{cfg.generation}/", base)
        check_in(store, cfg, rank, latest=base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=cfg.tp,
                                timeout=timedelta(seconds=cfg.pg_timeout_s))
        return ProcessGroupComm()
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{cfg.master_port}", rank=rank,
        world_size=cfg.tp, timeout=timedelta(seconds=cfg.pg_timeout_s),
    )
    return ProcessGroupComm()


def worker_main(cfg: WorkerConfig, rank: int, conn: Any | None) -> None:
    """Process body; conn is the leader's pipe to the front end (None on followers)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    torch.set_num_threads(cfg.threads)
    try:
        if cfg.nice > 0:  # only ever lowered: raising a priority needs privileges
            os.nice(cfg.nice)
        t0 = time.perf_counter()
        if cfg.backend == "onnx":
            if cfg.tp != 1:
                raise ValueError("the ONNX backend runs whole models: use --tp 1 (and replicas)")
            from ..engine.onnx_runner import OnnxModelRunner

            runner = OnnxModelRunner(cfg)
            from .leader import Leader

            Leader(cfg, runner, runner.comm, conn, time.perf_counter() - t0).run()
            return
        comm = _init_group(cfg, rank)
        from shardserve_sharding.checkpoint.io import DTYPES
        from shardserve_sharding.sharded_load import load_sharded_model

        from ..engine.runner import CacheGeometry, ModelRunner

        dtype = DTYPES[cfg.dtype]
        model = load_sharded_model(cfg.model_dir, comm, dtype=dtype,
                                   verify_hashes=cfg.verify_hashes)
        geometry = CacheGeometry(cfg.kv_cache_tokens, cfg.block_size, cfg.max_batch_size)
        runner = ModelRunner(model, geometry, dtype)
        load_s = time.perf_counter() - t0
        if rank == 0:
            from .leader import Leader

            Leader(cfg, runner, comm, conn, load_s).run()
        else:
            follower_loop(runner, cfg)
    except BaseException as e:  # report to the front end, then die: the group is restarted
        if conn is None and cfg.rendezvous:  # a joined rank: one line in its host's log
            print(f"shardserve worker: rank {rank} of generation {cfg.generation}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if conn is not None:
            try:
                conn.send(Fatal(f"rank {rank}: {type(e).__name__}: {e}",
                                traceback.format_exc()))
            except Exception:
                pass
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def follower_loop(runner: Any, cfg: WorkerConfig) -> None:
    from ..engine.runner import FLAT, FORWARD, STOP, broadcast_plan

    while True:
        plan = broadcast_plan(None)
        if plan.kind == STOP:
            return
        if plan.kind in (FORWARD, FLAT):
            runner.forward(plan)
