"""Recurrent causal language model (stacked LSTM or GRU with residuals and norms) in plain torch.

    x = embed(tokens)
    per layer:  x = x + proj(RNN(RMSNorm(x)))       RNN: one LSTM or GRU layer, hidden units
    logits = output(RMSNorm(x))                     (tied to the embedding or not)

The recurrence is the textbook one (torch.nn.LSTM / torch.nn.GRU, linear_before_reset for the
GRU); the fused gate weights are stored *unit-major*: row u * G + g is gate g of hidden unit u
(gate order as torch's: LSTM i, f, g, o; GRU r, z, n), so a contiguous cut of the rows (the
split table's colwise) keeps whole units, with all their gates, on one TP rank. See
`torch_gate_layout` for the conversion to and from torch's gate-major layout.

Tensor parallelism reads the local widths from the weight shapes: a rank owns hl = hidden / tp
units (their gate rows of w_ih and w_hh, their c), and the recurrent projection w_hh needs every
unit's h, so h is all-gathered once per step (the one collective of a recurrence step;
gather_hidden, a no-op on a plain model). proj is rowwise (all-reduced), the output vocab-split.

Decoding keeps a RecurrentState: per layer and sequence the local h (and c for the LSTM),
[L, B, hl] or [L, B, 2 hl]; a step runs the new tokens through the cell and keeps each row's
state after its last real token, so ragged prefill and decode share one code path and a token
costs O(n_layers) whatever the length.

Quick check:  python -m shardserve_sharding.models.rnnlm   (runs the tiny config once)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .llama import RMSNorm

CELLS = {"lstm": 4, "gru": 3}
"""Cell kind -> gates per hidden unit."""


@dataclass(frozen=True)
class RNNLMConfig:
    """Shape of a recurrent LM."""

    vocab_size: int
    """Rows of the embedding (true vocabulary size, before any TP padding)."""
    dim: int = 128
    """Width of the residual stream (and of each RNN layer's input)."""
    hidden: int = 256
    """Hidden units of each RNN layer (split across TP ranks)."""
    n_layers: int = 2
    """Number of recurrent blocks."""
    cell: str = "lstm"
    """"lstm" or "gru"."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Output projection shares the embedding matrix."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generation) to schedule; the recurrence itself has no limit."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "hidden", "n_layers", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")

    @property
    def n_gates(self) -> int:
        return CELLS[self.cell]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RNNLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown rnnlm config keys: {unknown}; known: {sorted(known)}")
        return cls(**d)


RNNLM_CONFIGS: dict[str, RNNLMConfig] = {
    "small": RNNLMConfig(vocab_size=8192, dim=256, hidden=512, n_layers=2),
    "tiny": RNNLMConfig(vocab_size=256, dim=32, hidden=24, n_layers=2, max_seq_len=512),
    "tiny-gru": RNNLMConfig(vocab_size=256, dim=32, hidden=24, n_layers=2, cell="gru",
                            max_seq_len=512),
}


def torch_gate_layout(w: torch.Tensor, n_gates: int, *, to_torch: bool = True) -> torch.Tensor:
    """Unit-major gate rows [H*G, ...] (row u*G + g) <-> torch's gate-major [G*H, ...]."""
    rest = w.shape[1:]
    if to_torch:  # [H, G, ...] -> [G, H, ...]
        return w.reshape(-1, n_gates, *rest).transpose(0, 1).reshape(w.shape)
    return w.reshape(n_gates, -1, *rest).transpose(0, 1).reshape(w.shape)


class RecurrentState:
    """Recurrent state [n_layers, B, width]: local h (then c for the LSTM) per row and layer.

    Zeros at the start, which is the initial state of the full-sequence forward."""

    def __init__(self, *, n_layers: int, batch_size: int, width: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.state = torch.zeros((n_layers, batch_size, width), dtype=dtype,
                                 device=device)  # [L, B, W]
        self.valid: torch.Tensor | None = None  # [B, T] bool, None when every column is real

    @classmethod
    def from_tensor(cls, state: torch.Tensor) -> RecurrentState:
        """Wrap an existing state [L, B, W] (a slot pool gathers rows into one)."""
        obj = cls.__new__(cls)
        obj.state, obj.valid = state, None
        return obj

    @property
    def batch_size(self) -> int:
        return self.state.shape[1]

    def begin_step(self, positions: torch.Tensor, num_new: torch.Tensor) -> None:
        """positions [B, T] long (unused: the state is where each row is); num_new [B] long."""
        bsz, seqlen = positions.shape
        if bsz != self.batch_size or num_new.shape != (bsz,):
            raise ValueError(
                f"step has {bsz} rows (num_new {tuple(num_new.shape)}), cache has {self.batch_size}"
            )
        steps = torch.arange(seqlen, device=self.state.device)
        valid = steps[None, :] < num_new.to(self.state.device)[:, None]  # [B, T]
        self.valid = None if bool(valid.all()) else valid

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order."""
        self.state = self.state.index_select(1, rows.to(self.state.device))
        self.valid = None


def _no_gather(h: torch.Tensor) -> torch.Tensor:
    return h


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: RNNLMConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.lstm = cfg.cell == "lstm"
        self.n_gates = cfg.n_gates
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        g = cfg.n_gates * cfg.hidden
        self.w_ih = nn.Linear(cfg.dim, g, bias=True)  # unit-major gate rows
        self.w_hh = nn.Linear(cfg.hidden, g, bias=True)
        self.proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    @property
    def local_hidden(self) -> int:
        """Hidden units on this rank (all of them on a plain model)."""
        return self.w_hh.weight.shape[0] // self.n_gates

    def forward(self, x: torch.Tensor, cache: RecurrentState | None,
                gather: Callable[[torch.Tensor], torch.Tensor] = _no_gather) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; gather: local h [B, hl] -> every unit's h [B, H]."""
        bsz, seqlen, _ = x.shape
        hl, ng = self.local_hidden, self.n_gates
        xg = self.w_ih(self.norm(x)).view(bsz, seqlen, hl, ng)  # [B, T, hl, G]
        if cache is None:
            h = x.new_zeros(bsz, hl)  # [B, hl]
            c = x.new_zeros(bsz, hl) if self.lstm else None
            valid = None
        else:
            st = cache.state[self.layer_id].to(x.dtype)  # [B, W]
            h, c = (st[:, :hl], st[:, hl:]) if self.lstm else (st, None)
            valid = cache.valid
        outs = []
        for t in range(seqlen):
            hg = self.w_hh(gather(h)).view(bsz, hl, ng)  # [B, hl, G]
            if self.lstm:
                i, f, g, o = (xg[:, t] + hg).unbind(-1)  # [B, hl] each
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
            else:
                xr, xz, xn = xg[:, t].unbind(-1)
                hr, hz, hn = hg.unbind(-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h_new = (1 - z) * torch.tanh(xn + r * hn) + z * h
                c_new = None
            if valid is not None:  # padding columns leave the state as it was
                keep = valid[:, t, None]  # [B, 1]
                h_new = torch.where(keep, h_new, h)
                if c_new is not None:
                    c_new = torch.where(keep, c_new, c)
            h, c = h_new, c_new
            outs.append(h)
        if cache is not None:
            new = torch.cat([h, c], dim=-1) if self.lstm else h  # [B, W]
            cache.state[self.layer_id] = new.to(cache.state.dtype)
        return x + self.proj(torch.stack(outs, dim=1))  # [B, T, dim]


class RNNLM(nn.Module):
    """The recurrent causal LM. See models/base.py for the forward contract."""

    family = "rnnlm"

    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: skip nn.Embedding's own init (init_weights sets every weight; see ConvLM)
        self.tok_embeddings = nn.Embedding(
            config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim)
        )
        self.layers = nn.ModuleList(RecurrentBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(std) for embeddings, proj scaled by 1/sqrt(2 n_layers), uniform(+-1/sqrt(H))
        for the recurrent weights and biases (torch.nn.LSTM's init), norms 1."""
        if self.tok_embeddings.weight.is_meta:
            return  # shapes only (meta device): nothing to initialise
        bound = 1 / math.sqrt(self.config.hidden)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif ".w_ih." in name or ".w_hh." in name:
                nn.init.uniform_(p, -bound, bound)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def state_width(self) -> int:
        """Per-layer state of one sequence on this rank: hl (GRU) or 2 hl (LSTM)."""
        blk = next(iter(self.layers.values() if isinstance(self.layers, nn.ModuleDict)
                        else self.layers))
        return blk.local_hidden * (2 if blk.lstm else 1)

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> RecurrentState:
        """max_len is accepted for the common contract; the state does not grow with length."""
        del max_len
        return RecurrentState(n_layers=len(self.layers), batch_size=batch_size,
                              width=self.state_width(), dtype=dtype, device=device)

    def gather_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Local h [B, hl] -> every unit's h [B, H]: identity on a plain model; on a TP-cut one
        (apply_tensor_parallel sets tp_comm) an all-gather with its gradient rule."""
        comm = getattr(self, "tp_comm", None)
        if comm is None or comm.world_size == 1:
            return h
        from ..tp.layers import gather_from_tp  # only a cut model gets here

        return gather_from_tp(h, comm)

    def run_layers(self, x: torch.Tensor, cache: RecurrentState | None) -> torch.Tensor:
        """The blocks (all, or a pipeline stage's) over hidden states x [B, T, dim]."""
        layers = self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers
        for layer in layers:
            x = layer(x, cache, self.gather_hidden)
        return x

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        cache: RecurrentState | None = None,
        logits_index: torch.Tensor | None = None,  # [B]
    ) -> torch.Tensor:
        del positions  # a recurrence needs no positions; the state knows where each row is
        x = self.run_layers(self.embed(tokens), cache)  # [B, T, dim]
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
    for name in ("tiny", "tiny-gru"):
        cfg = RNNLM_CONFIGS[name]
        model = RNNLM(cfg)
        toks = torch.randint(0, cfg.vocab_size, (2, 7))
        pos = torch.arange(7).expand(2, 7)
        print(name, "logits", tuple(model(toks, pos).shape))
