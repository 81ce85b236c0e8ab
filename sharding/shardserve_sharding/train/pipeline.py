"""Pipeline stages and the GPipe schedule (all forwards, then all backwards) over point-to-point.

A stage is the plain model with only its layers kept (global layer names preserved, so the
checkpoint needs no renaming); the first stage embeds, the last one normalises and projects
(with tied embeddings it keeps its own copy of the embedding, whose gradient is summed with
the first stage's, as Megatron-LM does). Activations go forward and their gradients backward
with torch.distributed send/recv between the same TP rank of neighbouring stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models import model_spec
from ..partition import stage_layers


def cut_stage(model: nn.Module, pp: int, stage: int) -> nn.Module:
    """Keep only this stage's layers (as a ModuleDict keyed by global index) and ends."""
    layers = stage_layers(len(model.layers), pp)[stage]
    first, last = stage == 0, stage == pp - 1
    tied = bool(getattr(model.config, "tie_embeddings", False))
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
    if not first and not (last and tied):
        del model.tok_embeddings
    if not last:
        del model.norm
        del model.output
    elif tied and not first:
        # our own copy of the embedding, used only as the output projection
        model.tok_embeddings.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
        model.output.weight = model.tok_embeddings.weight
    model.stage, model.first, model.last = stage, first, last
    return model


def stage_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] (first stage) or hidden [B, T, dim] -> hidden, or logits [B, T, V] (last)."""
    h = model.embed(x) if model.first else x  # [B, T, dim]
    h = model_spec(model.family).stage_layers(model, h)  # [B, T, dim]
    if model.last:
        return model.lm_head(model.norm(h))  # [B, T, V]
    return h


@dataclass
class P2P:
    """Neighbour ranks of this stage (same dp and tp coordinates)."""

    prev: int | None
    next: int | None


def gpipe_step(
    model: nn.Module,
    p2p: P2P,
    microbatches: list[tuple[torch.Tensor, torch.Tensor]],
    hidden_shape: tuple[int, ...],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    train: bool = True,
) -> float:
    """Run all micro-batches forward, then backward (if train); returns the summed loss
    contributions on the last stage (0.0 elsewhere)."""
    inputs, outputs, losses = [], [], []
    total = 0.0
    for tokens, targets in microbatches:
        if model.first:
            x = tokens
        else:
            x = torch.empty(hidden_shape, dtype=dtype)
            dist.recv(x, src=p2p.prev)
            x.requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = stage_forward(model, x)
        if model.last:
            with torch.set_grad_enabled(train):
                loss = loss_fn(out, targets)
            total += float(loss.detach())
            losses.append(loss)
        else:
            dist.send(out.detach().contiguous(), dst=p2p.next)
            outputs.append(out)
        inputs.append(x)
    if not train:
        return total
    for m in reversed(range(len(microbatches))):
        x = inputs[m]
        if model.last:
            losses[m].backward()
        else:
            grad = torch.empty(hidden_shape, dtype=dtype)
            dist.recv(grad, src=p2p.next)
            outputs[m].backward(grad)
        if not model.first:
            dist.send(x.grad.contiguous(), dst=p2p.prev)
    return total
