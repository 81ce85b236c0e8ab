"""Gated convolutional language model (Dauphin et al. 2017 style) in plain torch.

The seed article's Keras text model (Embedding -> Conv1D(128, 5, ReLU) -> MaxPooling1D(5) ->
Dense softmax) turned into a causal LM: each block is
    x = x + proj(GLU(causal_conv(RMSNorm(x))))
with one left-padded convolution producing both GLU halves ([value; gate] on the output
channels, out = value * sigmoid(gate)). There is no pooling over time, which would leak the
future. The receptive field is n_layers * (kernel_size - 1) + 1 tokens; positions are not
needed, so there is no positional table.

Decoding keeps a ConvState: per layer and sequence the last kernel_size - 1 convolution inputs
(the normed activations). A step convolves concat(state, new inputs), so a new token costs
O(n_layers * kernel_size) and prefill (ragged, right-padded) and decode (T = 1) share one code
path. No torch.distributed here: the TP code cuts conv/proj by the split table and the local
hidden width is read from the weight shapes, so the same code runs a full model or a shard.

Quick check:  python -m shardserve_sharding.models.convlm   (runs the tiny config once)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .llama import RMSNorm


@dataclass(frozen=True)
class ConvLMConfig:
    """Shape of a gated convolutional LM."""

    vocab_size: int
    """Rows of the embedding (true vocabulary size, before any TP padding)."""
    dim: int = 128
    """Width of the residual stream (the article's embedding size)."""
    hidden: int = 128
    """Output channels of each GLU (the article's 128 filters); the conv produces 2 * hidden."""
    n_layers: int = 4
    """Number of gated convolution blocks."""
    kernel_size: int = 5
    """Convolution width in tokens (the article's kernel 5); the state keeps kernel_size - 1."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Output projection shares the embedding matrix."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generation) to schedule; the convolution itself has no limit."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "hidden", "n_layers", "kernel_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def receptive_field(self) -> int:
        """Tokens (including the current one) that can influence one output."""
        return self.n_layers * (self.kernel_size - 1) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown convlm config keys: {unknown}; known: {sorted(known)}")
        return cls(**d)


CONVLM_CONFIGS: dict[str, ConvLMConfig] = {
    # The article's sizes: embedding 128, 128 filters, kernel 5. vocab_size is set at train time.
    "article": ConvLMConfig(vocab_size=8192, dim=128, hidden=128, n_layers=4, kernel_size=5),
    "tiny": ConvLMConfig(
        vocab_size=256, dim=32, hidden=48, n_layers=2, kernel_size=3, max_seq_len=512
    ),
}


class ConvState:
    """Convolution state [n_layers, B, dim, kernel_size - 1]: the last conv inputs per row.

    Zeros at the start, which is exactly the left padding of the full-sequence forward. Memory
    is O(kernel_size) per sequence, independent of max_len.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        dim: int,
        kernel_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.state = torch.zeros(
            (n_layers, batch_size, dim, kernel_size - 1), dtype=dtype, device=device
        )  # [L, B, dim, K-1]
        self._idx: torch.Tensor | None = None  # [B, dim, K-1] gather index into concat

    @classmethod
    def from_tensor(cls, state: torch.Tensor) -> ConvState:
        """Wrap an existing state [L, B, dim, K-1] (a slot pool gathers rows into one)."""
        obj = cls.__new__(cls)
        obj.state, obj._idx = state, None
        return obj

    @property
    def batch_size(self) -> int:
        return self.state.shape[1]

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        """positions [B, T] long (unused: the state knows where each row is); num_new [B] long."""
        bsz = positions.shape[0]
        if bsz != self.batch_size or num_new.shape != (bsz,):
            raise ValueError(
                f"step has {bsz} rows (num_new {tuple(num_new.shape)}), cache has {self.batch_size}"
            )
        _, _, dim, km1 = self.state.shape
        # In concat(state, new) row b's last real input sits at km1 + num_new[b] - 1, so the
        # window of km1 inputs ending there starts at num_new[b] (0: the old state, unchanged).
        steps = torch.arange(km1, device=self.state.device)
        idx = num_new.to(self.state.device)[:, None] + steps[None, :]  # [B, K-1]
        self._idx = idx[:, None, :].expand(bsz, dim, km1)  # [B, dim, K-1]

    def update(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        """u [B, dim, T] new conv inputs -> concat(state, u) [B, dim, K-1+T]; advances the state."""
        if self._idx is None:
            raise RuntimeError("ConvState.update called before begin_step")
        full = torch.cat([self.state[layer].to(u.dtype), u], dim=2)  # [B, dim, K-1+T]
        self.state[layer] = full.gather(2, self._idx)  # [B, dim, K-1]
        return full

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order."""
        self.state = self.state.index_select(1, rows.to(self.state.device))
        self._idx = None


class GatedConvBlock(nn.Module):
    def __init__(self, cfg: ConvLMConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.kernel_size = cfg.kernel_size
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Output channels: [value a (hidden); gate g (hidden)]. Padding is applied by hand.
        self.conv = nn.Conv1d(cfg.dim, 2 * cfg.hidden, cfg.kernel_size, bias=True)
        self.proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cache: ConvState | None) -> torch.Tensor:
        u = self.norm(x).transpose(1, 2)  # [B, dim, T]
        if cache is None:
            u = F.pad(u, (self.kernel_size - 1, 0))  # [B, dim, K-1+T] zero left padding
        else:
            u = cache.update(self.layer_id, u)  # [B, dim, K-1+T]
        h = self.conv(u)  # [B, 2H, T] (no padding inside: the causal left context is in u)
        a, g = h.transpose(1, 2).chunk(2, dim=-1)  # [B, T, H] each
        return x + self.proj(a * torch.sigmoid(g))  # [B, T, dim]


class ConvLM(nn.Module):
    """The gated convolutional causal LM. See models/base.py for the forward contract."""

    family = "convlm"

    def __init__(self, config: ConvLMConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: skip nn.Embedding's own init (init_weights below sets every weight; on the
        # meta device its normal_ would pull in torch's decompositions, ~2 s of import)
        self.tok_embeddings = nn.Embedding(
            config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim)
        )
        self.layers = nn.ModuleList(GatedConvBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(std) everywhere, proj scaled by 1/sqrt(2 n_layers), norms 1, conv bias 0."""
        if self.tok_embeddings.weight.is_meta:
            return  # shapes only (meta device): nothing to initialise
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("conv.bias"):
                nn.init.zeros_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> ConvState:
        """max_len is accepted for the common contract; the state does not grow with length."""
        del max_len
        cfg = self.config
        return ConvState(
            n_layers=len(self.layers),
            batch_size=batch_size,
            dim=cfg.dim,
            kernel_size=cfg.kernel_size,
            dtype=dtype,
            device=device,
        )

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        cache: ConvState | None = None,
        logits_index: torch.Tensor | None = None,  # [B]
    ) -> torch.Tensor:
        del positions  # a conv model needs no positions; the cache knows where each row is
        x = self.embed(tokens)  # [B, T, dim]
        for layer in self.layers:
            x = layer(x, cache)
        if logits_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, logits_index]  # [B, dim]
        return self.lm_head(self.norm(x))  # [B, V] or [B, T, V]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding lookup; the TP code replaces tok_embeddings, not this method."""
        return self.tok_embeddings(tokens)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x)


if __name__ == "__main__":
    cfg = CONVLM_CONFIGS["tiny"]
    model = ConvLM(cfg)
    toks = torch.randint(0, cfg.vocab_size, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    print("logits", tuple(model(toks, pos).shape), "receptive field", cfg.receptive_field)
