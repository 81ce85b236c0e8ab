"""Shared pieces of the sharding tests: random tiny configs, random layouts, checkpoints, TP runs.

Used by test_partition.py, test_tp.py and test_reshard.py (imported by name, like
megatron_writer.py). Nothing here is a test.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

from shardserve_sharding.checkpoint.io import write_checkpoint
from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
from shardserve_sharding.models import ConvLMConfig, LlamaConfig, build_model, checkpoint_names
from shardserve_sharding.models.rnnlm import RNNLMConfig
from shardserve_sharding.partition import valid_tps
from shardserve_sharding.tp.apply import apply_tensor_parallel
from shardserve_sharding.tp.comm import run_ranks

MAX_TP = 6  # threads per simulated group: enough for KV replication and uneven vocabularies


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| (the acceptance measure of every logits comparison)."""
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


@st.composite
def llama_configs(draw) -> LlamaConfig:
    """Tiny GQA/MHA/MQA configs: KV heads 1-3 (often fewer than TP), odd vocabularies."""
    n_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6]))  # rotate-half rope needs an even head_dim
    n_heads = n_kv * group
    return LlamaConfig(
        vocab_size=draw(st.integers(5, 41)),
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        intermediate_size=draw(st.sampled_from([6, 12, 18, 24])),
        rope_theta=draw(st.sampled_from([100.0, 10000.0])),
        tie_embeddings=draw(st.booleans()),
        max_seq_len=32,
    )


@st.composite
def convlm_configs(draw) -> ConvLMConfig:
    return ConvLMConfig(
        vocab_size=draw(st.integers(5, 41)),
        dim=draw(st.integers(2, 10)),
        hidden=draw(st.sampled_from([2, 3, 4, 6, 12])),
        n_layers=draw(st.integers(1, 3)),
        kernel_size=draw(st.integers(1, 4)),
        tie_embeddings=draw(st.booleans()),
        max_seq_len=32,
    )


@st.composite
def rnnlm_configs(draw) -> RNNLMConfig:
    return RNNLMConfig(
        vocab_size=draw(st.integers(5, 41)),
        dim=draw(st.integers(2, 10)),
        hidden=draw(st.sampled_from([2, 3, 4, 6, 12])),
        n_layers=draw(st.integers(1, 3)),
        cell=draw(st.sampled_from(["lstm", "gru"])),
        tie_embeddings=draw(st.booleans()),
        max_seq_len=32,
    )


models = st.one_of(
    st.tuples(st.just("llama"), llama_configs()),
    st.tuples(st.just("convlm"), convlm_configs()),
    st.tuples(st.just("rnnlm"), rnnlm_configs()),
)
"""(family, config) over every family."""


def tps_of(family: str, config: Any) -> list[int]:
    return valid_tps(family, config, limit=MAX_TP)


def layouts(family: str, config: Any) -> st.SearchStrategy[tuple[int, int]]:
    """(tp, pp): tp among the valid TPs, pp from 1 to n_layers."""
    return st.tuples(st.sampled_from(tps_of(family, config)), st.integers(1, config.n_layers))


def random_model(family: str, config: Any, seed: int = 0) -> torch.nn.Module:
    """A model whose every parameter is random (norms and conv biases too, unlike init)."""
    torch.manual_seed(seed)
    model = build_model(family, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def write_model(dst: Path, model: torch.nn.Module, tokenizer: Any = None) -> Path:
    """The model as a TP=1, PP=1 fp32 checkpoint (write_checkpoint, streaming)."""
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    return write_checkpoint(
        dst,
        family=model.family,
        config=model.config.to_dict(),
        tensors=[(n, params[n].detach()) for n in names],
        specs=[TensorSpec(n, torch.float32, tuple(params[n].shape)) for n in names],
        tokenizer=tokenizer,
    )


def tokens_for(config: Any, batch: int = 2, length: int = 7, seed: int = 1):
    """Fixed random tokens [B, T] (every id, including the last vocabulary rows) and positions."""
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    toks[0, 0] = config.vocab_size - 1  # the last row, which lives next to the padding
    return toks, torch.arange(length).expand(batch, length)


def tp_copies_logits(model: torch.nn.Module, tp: int, tokens, positions) -> list[torch.Tensor]:
    """Logits of every rank of a TP group of threads, each cutting a copy of `model`."""

    def rank_fn(comm, rank):
        local = apply_tensor_parallel(copy.deepcopy(model), comm).eval()
        with torch.no_grad():
            return local(tokens, positions)

    return run_ranks(tp, rank_fn)


def sharded_logits(directory: Path, tp: int, tokens, positions) -> list[torch.Tensor]:
    """Logits of every rank of a thread TP group serving `directory` (any layout)."""
    from shardserve_sharding.sharded_load import load_sharded_model

    def rank_fn(comm, rank):
        model = load_sharded_model(directory, comm)
        with torch.no_grad():
            return model(tokens, positions)

    return run_ranks(tp, rank_fn)


def tp_grads(model: torch.nn.Module, comm, tokens, positions, targets) -> dict[str, torch.Tensor]:
    """Gradients of a mean cross-entropy loss on this rank's cut of a copy of `model`."""
    import torch.nn.functional as F

    local = apply_tensor_parallel(copy.deepcopy(model), comm).train()
    logits = local(tokens, positions)  # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in local.named_parameters()}


def gloo_rank_main(rank: int, world: int, port: int, out_dir: str, jobs: list[tuple]) -> None:
    """One process of a real gloo group (ProcessGroupComm); runs `jobs` in order.

    ("load", directory): load_sharded_model(directory) at TP=world, logits on tokens_for(config).
    ("grad", family, config_dict, seed): random_model(...) cut at TP=world, tp_grads on
    tokens_for(config) with targets from seed 2. Results go to out_dir/rank{rank}.pt as
    {"results": [one per job]} or {"error": str}.
    """
    import torch.distributed as dist

    from shardserve_sharding.models import config_from_dict
    from shardserve_sharding.sharded_load import load_sharded_model
    from shardserve_sharding.tp.comm import ProcessGroupComm

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    out: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        comm = ProcessGroupComm()
        results = []
        for job in jobs:
            if job[0] == "load":
                model = load_sharded_model(job[1], comm)
                toks, pos = tokens_for(model.config)
                with torch.no_grad():
                    results.append(model(toks, pos))
            else:
                _, family, cfg, seed = job
                model = random_model(family, config_from_dict(family, cfg), seed)
                toks, pos = tokens_for(model.config)
                targets, _ = tokens_for(model.config, seed=2)
                results.append(tp_grads(model, comm, toks, pos, targets))
        out["results"] = results
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # reported to the parent, which fails the test
        out["error"] = f"{type(e).__name__}: {e}"
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
