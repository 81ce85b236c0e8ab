"""The step graphs that are exported to ONNX: one forward of a continuous-batching step.

Llama (paged KV cache as explicit inputs, new keys/values as outputs):
    inputs   tokens [B, T] int64, positions [B, T] int64, read_slots [B, S] int64,
             past_mask [B, T, S] bool, new_mask [B, T, T] bool, logits_index [B] int64,
             k_cache, v_cache [L, N, Hkv, D] (the whole block pool, bound zero-copy)
    outputs  logits [B, V], k_new, v_new [L, B, T, Hkv, D]
Attention is split into a cached part (the gathered pool slots) and a new part (this step's
keys), so the pool is only read by the graph; the host writes the new keys into it. This is
the same paged cache and block accounting as the torch workers.

Conv LM (conv state as explicit input and output):
    inputs   tokens [B, T], state [L, B, dim, K-1], num_new [B], logits_index [B]
    outputs  logits [B, V], new_state [L, B, dim, K-1]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm spelled out in exportable ops (aten::rms_norm has no ONNX opset-17 form)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.eps)
    return mod.weight * xf.to(x.dtype)


def _ffn(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, ff.w13.weight).chunk(2, dim=-1)  # [B, T, I] each
    return F.linear(F.silu(gate) * up, ff.w2.weight)


class LlamaStep(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        attn = model.layers[0].attention
        self.h, self.hkv, self.d = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def forward(self, tokens, positions, read_slots, past_mask, new_mask, logits_index,
                k_cache, v_cache):
        m = self.model
        h, hkv, d = self.h, self.hkv, self.d
        g = h // hkv
        bsz, seqlen = tokens.shape
        x = m.tok_embeddings(tokens)  # [B, T, dim]
        cos = m.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
        sin = m.rope_sin[positions].unsqueeze(1).to(x.dtype)
        pm = past_mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, T, S]
        nm = new_mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, T, T]
        scale = 1.0 / math.sqrt(d)
        k_out, v_out = [], []
        for i, layer in enumerate(m.layers):
            a = layer.attention
            y = _norm(layer.attention_norm, x)
            q, k, v = F.linear(y, a.wqkv.weight).split([h * d, hkv * d, hkv * d], dim=-1)
            q = q.view(bsz, seqlen, h, d).transpose(1, 2)  # [B, H, T, D]
            k = k.view(bsz, seqlen, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
            v = v.view(bsz, seqlen, hkv, d).transpose(1, 2)
            q = _rope(q, cos, sin)
            k = _rope(k, cos, sin)
            kp = k_cache[i][read_slots].permute(0, 2, 1, 3)  # [B, Hkv, S, D]
            vp = v_cache[i][read_slots].permute(0, 2, 1, 3)
            qg = q.reshape(bsz, hkv, g, seqlen, d)  # [B, Hkv, G, T, D]
            s_past = torch.matmul(qg, kp.unsqueeze(2).transpose(-1, -2)) * scale  # [B,Hkv,G,T,S]
            s_new = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B,Hkv,G,T,T]
            neg = torch.finfo(s_past.dtype).min
            s = torch.cat([s_past.masked_fill(~pm, neg), s_new.masked_fill(~nm, neg)], dim=-1)
            p = torch.softmax(s.float(), dim=-1).to(q.dtype)
            n_past = kp.shape[2]
            o = torch.matmul(p[..., :n_past], vp.unsqueeze(2)) + torch.matmul(
                p[..., n_past:], v.unsqueeze(2))  # [B, Hkv, G, T, D]
            o = o.reshape(bsz, h, seqlen, d).transpose(1, 2).reshape(bsz, seqlen, h * d)
            x = x + F.linear(o, a.wo.weight)
            x = x + _ffn(layer.feed_forward, _norm(layer.ffn_norm, x))
            k_out.append(k.transpose(1, 2))  # [B, T, Hkv, D]
            v_out.append(v.transpose(1, 2))
        rows = torch.arange(bsz, device=tokens.device)
        last = _norm(m.norm, x[rows, logits_index])  # [B, dim]
        logits = F.linear(last, m.tok_embeddings.weight if m.config.tie_embeddings
                          else m.output.weight)  # [B, V]
        return logits, torch.stack(k_out), torch.stack(v_out)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


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
