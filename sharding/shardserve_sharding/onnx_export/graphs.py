"""The conv LM's step as a torch module for torch.onnx export (the Llama step is written node
by node in llama_graph.py).

Conv LM (conv state as explicit input and output):
    inputs   tokens [B, T], state [L, B, dim, K-1], num_new [B], logits_index [B]
    outputs  logits [B, V], new_state [L, B, dim, K-1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm spelled out in exportable ops (aten::rms_norm has no ONNX opset-17 form)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.eps)
    return mod.weight * xf.to(x.dtype)


class ConvStep(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, state, num_new, logits_index):
        m = self.model
        x = m.tok_embeddings(tokens)  # [B, T, dim]
        km1 = state.shape[-1]
        bsz, dim = x.shape[0], x.shape[2]
        idx = (num_new[:, None] + torch.arange(km1, device=tokens.device)[None, :])  # [B, K-1]
        idx = idx[:, None, :].expand(bsz, dim, km1)  # [B, dim, K-1]
        new_state = []
        for i, blk in enumerate(m.layers):
            u = _norm(blk.norm, x).transpose(1, 2)  # [B, dim, T]
            full = torch.cat([state[i].to(u.dtype), u], dim=2)  # [B, dim, K-1+T]
            new_state.append(full.gather(2, idx))
            hh = F.conv1d(full, blk.conv.weight, blk.conv.bias)  # [B, 2H, T]
            av, gate = hh.transpose(1, 2).chunk(2, dim=-1)
            x = x + F.linear(av * torch.sigmoid(gate), blk.proj.weight)
        rows = torch.arange(bsz, device=tokens.device)
        last = _norm(m.norm, x[rows, logits_index])
        logits = F.linear(last, m.tok_embeddings.weight if m.config.tie_embeddings
                          else m.output.weight)
        return logits, torch.stack(new_state)
