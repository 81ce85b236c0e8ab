"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA) in plain torch.

RMSNorm, rotary embeddings (Hugging Face "rotate half" layout, theta from the config),
grouped-query attention with a fused QKV projection, SwiGLU MLP with a fused gate/up projection,
tied or untied output. No torch.distributed here: tensor parallelism is applied from outside by
shardserve_sharding.tp, which reads the split table; local head counts are derived from the
weight shapes, so the same code runs a full model or one TP shard of it.

Quick check:  python -m shardserve_sharding.models.llama   (runs the tiny config once)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops
from .cpu_gemm import bf16_emulated, cpu_linear
from .kv_cache import DenseKVCache


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family model."""

    vocab_size: int
    """Rows of the embedding (true vocabulary size, before any TP padding)."""
    dim: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention); divides n_heads."""
    intermediate_size: int
    """Hidden width of the SwiGLU MLP."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Output projection shares the embedding matrix."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generation) the rotary table covers."""

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown llama config keys: {unknown}")
        return cls(**d)


LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        intermediate_size=1536,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=8192,
    ),
    "tiny": LlamaConfig(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=128,
        rope_theta=10000.0,
        tie_embeddings=True,
        max_seq_len=512,
    ),
    "tiny-untied": LlamaConfig(
        vocab_size=509,
        dim=48,
        n_layers=3,
        n_heads=6,
        n_kv_heads=3,
        intermediate_size=96,
        rope_theta=500000.0,
        tie_embeddings=False,
        max_seq_len=512,
    ),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, returned in x's dtype (as Hugging Face Llama does)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one op instead of seven
    # F.rms_norm of a bf16/fp16 x computes in fp32 and rounds once: x.float(), normalise, .to()
    return weight * F.rms_norm(x, weight.shape, None, eps)


class Linear(nn.Linear):
    """nn.Linear whose bf16 inference GEMMs take this CPU's fastest path (cpu_gemm.cpu_linear:
    packed bf16 weights where bf16 is native, fp32 GEMMs of several rows where it is emulated).
    Training and fp32 are plain nn.Linear; modules swapped in by the TP code need not be this.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters  # not self.weight: nn.Module.__getattr__ costs ~0.5 us a lookup
        return cpu_linear(self, x, p["weight"], p.get("bias"))  # [..., out]


def attention(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None = None,  # [B, 1, T, S] bool or additive float, or None
    *,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Grouped-query SDPA in q's dtype; emulated bf16 is computed in fp32 (4-6x faster)."""
    dtype = q.dtype
    if bf16_emulated(q) or k.dtype != dtype:
        q, k, v = q.float(), k.float(), v.float()
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa
    )  # [B, H, T, D]
    return out.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_len, head_dim] in fp32 for the rotate-half layout, on the default
    device. Under a meta-device context they are empty meta tensors (computing them there would
    go through torch's reference ops and import the compiler stack, seconds of start-up)."""
    if torch.empty(0).is_meta:
        return (torch.empty(max_len, head_dim), torch.empty(max_len, head_dim))
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [..., D]; cos/sin broadcast to x, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [..., D]
    return torch.addcmul(x * cos, rotated, sin)


class _FastParts(nn.Module):
    """A module whose fused decode path calls its parts through a cached tuple of their bound
    `forward`s (no nn.Module.__call__ / __getattr__ per call: ~2 us each, ~400 a SmolLM2 step);
    setting any attribute (swapping a part, e.g. the TP or quantization code replacing a
    linear layer) drops the tuple, and the next call builds it again from the current parts."""

    _fast_names: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_fast", None)
        super().__setattr__(name, value)

    def _fast_parts(self) -> tuple:
        fast = self.__dict__.get("_fast")
        if fast is None:
            fast = self._build_fast()
            self.__dict__["_fast"] = fast
        return fast

    def _build_fast(self) -> tuple:
        return tuple(getattr(self, n).forward for n in self._fast_names)


class Attention(_FastParts):
    _fast_names = ("wqkv", "wo")

    def __init__(self, cfg: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = Linear(cfg.dim, qkv_out, bias=False)  # rows: [q heads; k heads; v heads]
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads

    def set_local_heads(self, n_heads: int, n_kv_heads: int) -> None:
        """Called by the TP code after cutting wqkv: this rank's head counts."""
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads

    def forward(
        self,
        x: torch.Tensor,  # [B, T, dim]
        cos: torch.Tensor,  # [B, 1, T, D]
        sin: torch.Tensor,  # [B, 1, T, D]
        cache: DenseKVCache | None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(bsz, seqlen, h + 2 * hkv, d)  # [B, T, H + 2 Hkv, D]
        # Query and key heads are adjacent: one rotary pass covers both.
        qk = apply_rope(
            qkv[:, :, : h + hkv], cos.transpose(1, 2), sin.transpose(1, 2)
        )  # [B, T, H + Hkv, D]
        return self._attend(qk, qkv[:, :, h + hkv :], cache)

    def forward_fused(
        self,
        x: torch.Tensor,  # [B, T, dim] bf16
        positions: torch.Tensor,  # [B * T] int64
        rope_cos: torch.Tensor,  # [S, D] fp32 table
        rope_sin: torch.Tensor,  # [S, D] fp32 table
        cache: DenseKVCache | None,
    ) -> torch.Tensor:
        """forward() with the rotary embedding applied in place by the fused kernel (reads each
        token's row of the tables: no gathered cos/sin); same values (fused_ops.py)."""
        bsz, seqlen, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        wqkv, wo = self._fast_parts()
        qkv = fused_ops.contiguous(wqkv(x))  # [B, T, (H + 2 Hkv) D]
        fused_ops.kernels().rotary_(qkv, positions, rope_cos, rope_sin, h + hkv, d)
        direct = getattr(cache, "attend_qkv", None)  # a paged cache: decode rows in one call
        if direct is not None:
            out = direct(self.layer_id, qkv.view(bsz * seqlen, -1))  # [B T, H D] or None
            if out is not None:
                return wo(out.view(bsz, seqlen, h * d))  # [B, T, dim]
        qkv = qkv.view(bsz, seqlen, h + 2 * hkv, d)  # [B, T, H + 2 Hkv, D]
        return self._attend(qkv[:, :, : h + hkv], qkv[:, :, h + hkv :], cache)

    def _attend(
        self,
        qk: torch.Tensor,  # [B, T, H + Hkv, D], rotated
        v: torch.Tensor,  # [B, T, Hkv, D]
        cache: DenseKVCache | None,
    ) -> torch.Tensor:
        bsz, seqlen = qk.shape[:2]
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = qk[:, :, :h].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, h:].transpose(1, 2)  # [B, Hkv, T, D]
        v = v.transpose(1, 2)  # [B, Hkv, T, D]
        if cache is None:
            out = attention(q, k, v, is_causal=True, enable_gqa=h != hkv)  # [B, H, T, D]
        elif getattr(cache, "attends", False):  # the cache runs the whole attention step
            out = cache.attend(self.layer_id, q, k, v)  # [B, H, T, D]
        else:
            k_all, v_all, mask = cache.update(self.layer_id, k, v)  # [B, Hkv, S, D], [B,1,T,S]
            out = attention(q, k_all, v_all, mask, enable_gqa=h != hkv)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(bsz, seqlen, h * d)  # [B, T, H D]
        return self.wo(out)


class FeedForward(_FastParts):
    _fast_names = ("w13", "w2")

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)  # [gate; up]
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # [B, T, I] each
        return self.w2(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with silu(gate) * up in one kernel pass (fused_ops.py): same values."""
        w13, w2 = self._fast_parts()
        gate_up = fused_ops.contiguous(w13(x))  # [B, T, 2I]
        return w2(fused_ops.kernels().silu_mul(gate_up))  # [B, T, dim]


class TransformerBlock(_FastParts):
    _fast_names = ("attention", "attention_norm", "feed_forward", "ffn_norm")

    def _build_fast(self) -> tuple:
        return tuple(getattr(self, n) for n in self._fast_names)  # the modules themselves

    def __init__(self, cfg: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The Llama-family causal LM. See models/base.py for the forward contract."""

    family = "llama"

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: skip nn.Embedding's own init (init_weights below sets every weight; on the
        # meta device its normal_ would pull in torch's decompositions, ~2 s of import)
        self.tok_embeddings = nn.Embedding(
            config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim)
        )
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [S, D]
        self.init_weights()

    def reset_buffers(self) -> None:
        """Recompute the rotary tables in fp32 (after building on the meta device)."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        device = self.norm.weight.device  # (a quantized embedding has no float weight)
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)

    def init_weights(self, std: float = 0.02) -> None:
        if self.tok_embeddings.weight.is_meta:
            return  # shapes only (meta device): nothing to initialise
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> DenseKVCache:
        attn = self.layers[0].attention
        return DenseKVCache(
            n_layers=len(self.layers),
            batch_size=batch_size,
            n_kv_heads=attn.n_kv_heads,
            head_dim=attn.head_dim,
            max_len=max_len,
            dtype=dtype,
            device=device,
        )

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        cache: DenseKVCache | None = None,
        logits_index: torch.Tensor | None = None,  # [B]
    ) -> torch.Tensor:
        x = self.embed(tokens)  # [B, T, dim]
        if self._can_fuse(x):
            return self.lm_head(self._fused_layers(x, positions, cache, logits_index))
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if logits_index is not None:
            if x.shape[1] == 1:  # decode: the only column (logits_index is all zeros)
                x = x[:, 0]  # [B, dim]
            else:
                rows = torch.arange(x.shape[0], device=x.device)
                x = x[rows, logits_index]  # [B, dim]
        return self.lm_head(self.norm(x))  # [B, V] or [B, T, V]

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """bf16 CPU inference with the fused kernels built (fused_ops.active), bf16 norm
        weights and fp32 rotary tables (the kernels' inputs)."""
        return (fused_ops.active(x) and self.norm.weight.dtype == torch.bfloat16
                and self.rope_cos.dtype == torch.float32)

    def _fused_layers(
        self,
        x: torch.Tensor,  # [B, T, dim]
        positions: torch.Tensor,  # [B, T]
        cache: DenseKVCache | None,
        logits_index: torch.Tensor | None,  # [B]
    ) -> torch.Tensor:
        """The blocks and the final norm through the fused kernels (fused_ops.py): each residual
        add is done in place in the same pass as the norm that follows it (the next block's
        attention_norm, or the final norm); same values as the plain loop of forward()."""
        k = fused_ops.kernels()
        # the residual stream, updated in place: never a view of something else (a weight)
        x = x.clone() if x._is_view() else x.contiguous()
        pos = positions.reshape(-1).to(torch.long).contiguous()  # [B * T] (the kernel's type)
        # per block: (attention, attention_norm, feed_forward, ffn_norm), cached (_FastParts)
        blocks = [layer._fast_parts() for layer in self.layers]
        blocks.append((None, self.norm, None, None))  # the final norm follows the last block
        cos, sin = self.rope_cos, self.rope_sin
        norm = blocks[0][1]
        h = k.add_rms_norm_(x, None, norm._parameters["weight"], norm.eps)  # [B, T, dim]
        for i in range(len(blocks) - 1):
            attn, _, ffn, norm = blocks[i]
            a = attn.forward_fused(h, pos, cos, sin, cache)  # [B, T, dim]
            h = k.add_rms_norm_(x, fused_ops.contiguous(a), norm._parameters["weight"], norm.eps)
            m = ffn.forward_fused(h)  # [B, T, dim]
            norm = blocks[i + 1][1]  # the next block's attention_norm, or the final norm
            h = k.add_rms_norm_(x, fused_ops.contiguous(m), norm._parameters["weight"], norm.eps)
        if logits_index is None:
            return h  # [B, T, dim]
        if h.shape[1] == 1:
            return h[:, 0]  # [B, dim]
        return h[torch.arange(h.shape[0], device=h.device), logits_index]  # [B, dim]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding lookup; the TP code replaces tok_embeddings, not this method."""
        return self.tok_embeddings(tokens)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x)


if __name__ == "__main__":
    cfg = LLAMA_CONFIGS["tiny"]
    model = Transformer(cfg)
    toks = torch.randint(0, cfg.vocab_size, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    print("logits", tuple(model(toks, pos).shape))
