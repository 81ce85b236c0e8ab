"""The training loop of one rank: model cut for (dp, tp, pp), AdamW, clipping, eval, checkpoints.

    shardserve train --family llama --config tiny --dp 2 --tp 2 --pp 2 --steps 200 --out runs/x

The global batch (batch_size sequences) is the same at every layout: DP replica d takes its
rows, then splits them into micro-batches for the pipeline. The loss of every micro-batch is
its summed token cross-entropy divided by the global token count, so gradients summed over
micro-batches and DP replicas are exactly the gradients of the global mean loss, and losses
match the 1 x 1 x 1 run up to summation order.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..split_table import SplitKind, split_kind
from ..tp.comm import ProcessGroupComm, ThreadGroup
from .checkpoint import latest_checkpoint, load_rank_state, save_checkpoint
from .data import TokenStream, synthetic_stream, text_stream
from .parallel_dims import Groups, ParallelDims, build_groups
from .pipeline import P2P, cut_stage, gpipe_step


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    out: str
    """Run directory: checkpoints (step_NNNNNN/), metrics.jsonl."""
    family: str = "llama"
    """Model family (a name in models.SPECS)."""
    model: str = "tiny"
    """Named config of the family (its ModelSpec's configs), its vocabulary replaced by the
    tokenizer's."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 32
    """Global batch in sequences."""
    micro_batches: int = 1
    """Pipeline micro-batches per DP replica and step."""
    seq_len: int = 48
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup: int = 20
    """Linear warm-up steps, then cosine decay to min_lr."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm (across TP and PP) to this; 0 disables."""
    dtype: str = "float32"
    seed: int = 0
    data: str = "synthetic"
    """'synthetic' (the copy task) or a path to a text file."""
    tokenizer: str | None = None
    """Tokenizer for a text file (.gguf, tokenizer.json or dir); default: train a BPE on it."""
    eval_interval: int = 100
    eval_batches: int = 4
    ckpt_interval: int = 200
    resume: bool = False
    """Continue from the latest checkpoint in `out` (same layout)."""
    pg_timeout_s: float = 60.0


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_data(cfg: TrainConfig) -> TokenStream:
    if cfg.data == "synthetic":
        return synthetic_stream(seed=cfg.seed)
    tok = None
    if cfg.tokenizer:
        from ..reshard import load_tokenizer_from

        tok = load_tokenizer_from(cfg.tokenizer)
    return text_stream(cfg.data, tok)


def model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    from dataclasses import replace

    from ..models import model_spec

    return replace(model_spec(cfg.family).named_config(cfg.model), vocab_size=vocab_size)


class RankTrainer:
    """Everything one rank does; run() returns the list of logged records (last stage)."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int) -> None:
        from ..models import build_model
        from ..tp.apply import apply_tensor_parallel

        self.cfg = cfg
        self.dims = ParallelDims(cfg.dp, cfg.tp, cfg.pp)
        self.dims.check_world(world)
        if cfg.batch_size % (cfg.dp * cfg.micro_batches):
            raise ValueError(
                f"batch_size {cfg.batch_size} must divide into dp {cfg.dp} x "
                f"micro_batches {cfg.micro_batches}"
            )
        self.rank = rank
        self.dp_rank, self.pp_rank, self.tp_rank = self.dims.coords(rank)
        self.groups = build_groups(self.dims, rank) if world > 1 else Groups(None, None, None, None)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.data = make_data(cfg)
        self.model_cfg = model_config(cfg, self.data.tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)  # every rank builds the same full model, then cuts it
        model = build_model(cfg.family, self.model_cfg)
        model = cut_stage(model, cfg.pp, self.pp_rank)
        comm = ProcessGroupComm(self.groups.tp) if cfg.tp > 1 else ThreadGroup(1).comm(0)
        self.model = apply_tensor_parallel(model, comm).to(self.dtype).train()
        self.p2p = P2P(
            self.dims.rank(self.dp_rank, self.pp_rank - 1, self.tp_rank) if self.pp_rank else None,
            self.dims.rank(self.dp_rank, self.pp_rank + 1, self.tp_rank)
            if self.pp_rank < cfg.pp - 1
            else None,
        )
        self.params = [p for _, p in self.model.named_parameters()]
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.out = Path(cfg.out)
        self.is_logger = self.model.last and self.dp_rank == 0 and self.tp_rank == 0

    # ---- pieces of a step
    def _microbatches(self, split: str, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        x, y = self.data.batch(split, step, cfg.batch_size, cfg.seq_len, cfg.seed)
        per = cfg.batch_size // cfg.dp
        x, y = (
            x[self.dp_rank * per : (self.dp_rank + 1) * per],
            y[self.dp_rank * per : (self.dp_rank + 1) * per],
        )
        return list(zip(x.chunk(cfg.micro_batches), y.chunk(cfg.micro_batches), strict=True))

    def _loss_fn(self, n_tokens: int):
        def fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return (
                F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
                / n_tokens
            )

        return fn

    def _hidden_shape(self) -> tuple[int, ...]:
        mb = self.cfg.batch_size // self.cfg.dp // self.cfg.micro_batches
        return (mb, self.cfg.seq_len, self.model_cfg.dim)

    def _reduce_loss(self, local: float) -> float:
        t = torch.tensor([local], dtype=torch.float64)
        if self.groups.dp is not None:
            dist.all_reduce(t, group=self.groups.dp)
        return float(t)

    def _sync_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.groups.dp is not None:
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat, group=self.groups.dp)
            off = 0
            for p, g in zip(self.params, grads, strict=True):
                n = g.numel()
                p.grad = flat[off : off + n].view_as(g).to(g.dtype)
                off += n
        if self.groups.embed is not None and hasattr(self.model, "tok_embeddings"):
            g = self.model.tok_embeddings.weight.grad
            if g is None:
                g = torch.zeros_like(self.model.tok_embeddings.weight)
            dist.all_reduce(g, group=self.groups.embed)
            self.model.tok_embeddings.weight.grad = g

    def _grad_norm(self) -> float:
        sq = torch.zeros((), dtype=torch.float64)
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if p.grad is None or id(p) in seen:
                continue
            seen.add(id(p))
            if split_kind(self.cfg.family, name) is SplitKind.REPLICATED and self.tp_rank != 0:
                continue  # identical on every TP rank: count once
            if name == "tok_embeddings.weight" and not self.model.first:
                continue  # the last stage's copy of a tied embedding
            g2 = p.grad.double().pow(2)
            hkv = getattr(self.model_cfg, "n_kv_heads", 0)
            if (split_kind(self.cfg.family, name) is SplitKind.FUSED_QKV and hkv
                    and self.cfg.tp > hkv):
                # KV heads are replicated tp/hkv times: count each copy's share once
                q_rows = self.model_cfg.n_heads // self.cfg.tp * self.model_cfg.head_dim
                sq += g2[:q_rows].sum() + g2[q_rows:].sum() / (self.cfg.tp // hkv)
                continue
            sq += g2.sum()
        if self.groups.model is not None:
            dist.all_reduce(sq, group=self.groups.model)
        return float(sq.sqrt())

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        n_tokens = cfg.batch_size * cfg.seq_len
        local = gpipe_step(
            self.model,
            self.p2p,
            self._microbatches("train", self.step),
            self._hidden_shape(),
            self._loss_fn(n_tokens),
            self.dtype,
        )
        loss = self._reduce_loss(local)
        t_comm = time.perf_counter()
        self._sync_grads()
        norm = self._grad_norm()
        comm_s = time.perf_counter() - t_comm
        if cfg.grad_clip and norm > cfg.grad_clip:
            scale = cfg.grad_clip / (norm + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.opt.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr_at(cfg, self.step - 1),
            "grad_norm": norm,
            "step_s": dt,
            "comm_s": comm_s,
            "tokens_per_s": n_tokens / dt,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        n_tokens = self.cfg.batch_size * self.cfg.seq_len * self.cfg.eval_batches
        total = 0.0
        for i in range(self.cfg.eval_batches):
            total += gpipe_step(
                self.model,
                self.p2p,
                self._microbatches("val", i),
                self._hidden_shape(),
                self._loss_fn(n_tokens),
                self.dtype,
                train=False,
            )
        return self._reduce_loss(total)

    # ---- the run
    def _log(self, rec: dict[str, Any]) -> None:
        if not self.is_logger:
            return
        self.records.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self, progress: bool = False) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            ck = latest_checkpoint(self.out)
            if ck is None:
                raise FileNotFoundError(f"{self.out}: no checkpoint to resume from")
            self.step = load_rank_state(self, ck)
        elif self.rank == 0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        if dist.is_initialized():
            dist.barrier()
        bar = None
        if progress and self.is_logger:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        if self.step == 0:
            self._log({"step": 0, "val_loss": self.evaluate()})
        while self.step < cfg.steps:
            rec = self.train_step()
            if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                rec["val_loss"] = self.evaluate()
                rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
            self._log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps:
                save_checkpoint(self)
        if bar is not None:
            bar.close()
        return self.records


def rank_main(cfg: TrainConfig, rank: int, world: int, port: int, progress: bool) -> None:
    """Entry of a spawned rank (or a torchrun process)."""
    from datetime import timedelta

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=cfg.pg_timeout_s),
        )
    try:
        RankTrainer(cfg, rank, world).run(progress=progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
