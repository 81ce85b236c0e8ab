"""Read Megatron-LM GPT/Llama checkpoints (legacy and Megatron-Core naming) tensor by tensor.

Layout: DIR/latest_checkpointed_iteration.txt ("release" or an iteration), then
DIR/{release|iter_NNNNNNN}/mp_rank_TT[_PPP]/model_optim_rng.pt, one per TP x PP rank. The
config comes from the checkpoint's `args`. Megatron's conventions, undone here:
- fused QKV is grouped per query group: [q heads of the group; k; v] for each group, and
  each TP rank holds whole groups;
- SwiGLU fc1 on each rank is [gate shard; up shard];
- the vocabulary is padded (make_vocab_size_divisible_by x TP); rows past the tokenizer's size
  are dropped;
- layer numbers are local to each pipeline stage; with tied embeddings the last stage keeps
  a copy as its output layer (ignored: the first stage's embedding is the weight).
Rank files load with weights_only=True (argparse.Namespace allowed) and mmap, one pipeline
stage at a time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.manifest import CheckpointError
from ..models.llama import LlamaConfig
from .base import ImportedLlamaSource
from .safe_pickle import torch_load_safe

_LAYER = re.compile(r"^(?:language_model\.encoder|decoder)\.layers\.(\d+)\.(.+)$")
_ALIASES = {  # per-layer suffix (legacy or core) -> role
    "input_layernorm.weight": "attn_norm",
    "input_norm.weight": "attn_norm",
    "self_attention.linear_qkv.layer_norm_weight": "attn_norm",
    "self_attention.query_key_value.weight": "qkv",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.dense.weight": "proj",
    "self_attention.linear_proj.weight": "proj",
    "post_attention_layernorm.weight": "mlp_norm",
    "post_attention_norm.weight": "mlp_norm",
    "pre_mlp_layernorm.weight": "mlp_norm",
    "mlp.linear_fc1.layer_norm_weight": "mlp_norm",
    "mlp.dense_h_to_4h.weight": "fc1",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.dense_4h_to_h.weight": "fc2",
    "mlp.linear_fc2.weight": "fc2",
}
_GLOBAL = {
    "language_model.embedding.word_embeddings.weight": "embed",
    "embedding.word_embeddings.weight": "embed",
    "language_model.encoder.final_layernorm.weight": "final_norm",
    "language_model.encoder.final_norm.weight": "final_norm",
    "decoder.final_layernorm.weight": "final_norm",
    "decoder.final_norm.weight": "final_norm",
    "language_model.output_layer.weight": "output",
    "output_layer.weight": "output",
    "word_embeddings_for_head.weight": "head_copy",
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_iteration_dir(root: Path) -> Path:
    tracker = root / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        raise CheckpointError(f"{tracker}: missing (not a Megatron-LM checkpoint directory)")
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release"
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text!r}")
    return root / f"iter_{int(text):07d}"


class MegatronSource(ImportedLlamaSource):
    """A Megatron-LM checkpoint seen as shardserve Llama tensors (global, one at a time)."""

    def __init__(self, directory: str | os.PathLike[str], tokenizer: Any = None) -> None:
        self.root = Path(directory)
        self.iter_dir = find_iteration_dir(self.root)
        self._tokenizer = tokenizer
        first = self._rank_path(0, 0, pp_hint=None)
        ck = torch_load_safe(first)
        args = ck.get("args")
        if args is None:
            raise CheckpointError(f"{first}: no 'args' in the checkpoint; cannot read its config")
        self.args = vars(args) if not isinstance(args, dict) else args
        self.tp = int(self.args.get("tensor_model_parallel_size", 1))
        self.pp = int(self.args.get("pipeline_model_parallel_size", 1))
        self._check_args(first)
        for t in range(self.tp):
            for p in range(self.pp):
                path = self._rank_path(t, p)
                if not path.is_file():
                    raise CheckpointError(
                        f"{path}: missing rank file (tp {t}, pp {p} of {self.tp} x {self.pp})"
                    )
        self.padded_vocab = int(self.args.get("padded_vocab_size") or 0)
        vocab = tokenizer.vocab_size if tokenizer is not None else self.padded_vocab
        a = self.args
        heads = int(a["num_attention_heads"])
        groups = (
            int(a.get("num_query_groups") or heads) if a.get("group_query_attention") else heads
        )
        self.config = LlamaConfig(
            vocab_size=int(vocab),
            dim=int(a["hidden_size"]),
            n_layers=int(a["num_layers"]),
            n_heads=heads,
            n_kv_heads=groups,
            intermediate_size=int(a["ffn_hidden_size"]),
            rope_theta=float(a.get("rotary_base", 10000)),
            norm_eps=float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
            tie_embeddings=not a.get("untie_embeddings_and_output_weights", False),
            max_seq_len=int(a.get("max_position_embeddings") or a.get("seq_length") or 2048),
        )
        div = int(self.args.get("make_vocab_size_divisible_by") or 1) * self.tp
        if (
            tokenizer is not None
            and self.padded_vocab
            and (vocab > self.padded_vocab or -(-vocab // div) * div != self.padded_vocab)
        ):
            raise CheckpointError(
                f"--tokenizer has {vocab} tokens, but this checkpoint's vocabulary was padded to "
                f"{self.padded_vocab} rows (multiple of {div}), which fits a tokenizer of "
                f"{self.padded_vocab - div + 1} to {self.padded_vocab} tokens: wrong tokenizer?"
            )
        if self.config.n_layers % self.pp:
            raise CheckpointError(
                f"{self.iter_dir}: {self.config.n_layers} layers do not split "
                f"evenly over {self.pp} pipeline stages"
            )
        self._stage: int | None = None
        self._ranks: list[dict[str, torch.Tensor]] = []

    def _check_args(self, path: Path) -> None:
        a = self.args
        if a.get("add_bias_linear", False) or a.get("add_qkv_bias", False):
            raise CheckpointError(f"{path}: linear biases (add_bias_linear) are not supported")
        if a.get("normalization", "RMSNorm") != "RMSNorm":
            raise CheckpointError(f"{path}: normalization {a.get('normalization')!r} unsupported")
        if a.get("position_embedding_type", "rope") != "rope":
            raise CheckpointError(
                f"{path}: position embedding {a.get('position_embedding_type')!r} unsupported"
            )
        if not a.get("swiglu", True):
            raise CheckpointError(f"{path}: only SwiGLU MLPs are supported")
        if a.get("rotary_interleaved", False):
            raise CheckpointError(f"{path}: interleaved rotary embeddings are not supported")

    def _rank_path(self, t: int, p: int, pp_hint: int | None = -1) -> Path:
        pp = self.pp if pp_hint == -1 else pp_hint
        if pp is None:  # before args are known: probe both spellings
            single = self.iter_dir / f"mp_rank_{t:02d}" / "model_optim_rng.pt"
            multi = self.iter_dir / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt"
            if single.is_file() or not multi.is_file():
                return single
            return multi
        name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
        return self.iter_dir / name / "model_optim_rng.pt"

    # ---- one pipeline stage in memory (mapped) at a time
    def _load_stage(self, stage: int) -> list[dict[str, torch.Tensor]]:
        # Mapped pages that were read stay resident until unmapped: re-open the stage's files
        # every few tensors so memory holds a handful of tensors, not a whole stage.
        self._reads = getattr(self, "_reads", 0) + 1
        if self._stage != stage or self._reads > 12:
            self._reads = 0
            self._ranks = []  # unmap the previous stage first
            ranks = []
            for t in range(self.tp):
                path = self._rank_path(t, stage)
                ck = torch_load_safe(path)
                model = ck.get("model")
                if model is None:
                    raise CheckpointError(
                        f"{path}: no 'model' state (virtual pipeline "
                        "checkpoints with model0/model1 are not supported)"
                    )
                flat = {
                    k: v
                    for k, v in _flatten(model).items()
                    if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
                }
                ranks.append(self._index(flat, path))
            self._ranks, self._stage = ranks, stage
        return self._ranks

    @staticmethod
    def _index(flat: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k, v in flat.items():
            m = _LAYER.match(k)
            if m and m.group(2) in _ALIASES:
                out[f"{m.group(1)}.{_ALIASES[m.group(2)]}"] = v
            elif k in _GLOBAL:
                out[_GLOBAL[k]] = v
            elif m is None or not m.group(2).endswith(("layer_norm_bias", "bias")):
                raise CheckpointError(f"{path}: unexpected tensor {k}")
        return out

    def _get(self, stage: int, key: str) -> list[torch.Tensor]:
        ranks = self._load_stage(stage)
        try:
            return [r[key] for r in ranks]
        except KeyError:
            raise CheckpointError(
                f"{self._rank_path(0, stage)}: tensor for {key!r} not found"
            ) from None

    # ---- the reader interface
    def tensor(self, name: str) -> torch.Tensor:
        c = self.config
        per_stage = c.n_layers // self.pp
        if name in ("tok_embeddings.weight", "output.weight"):
            stage, key = (
                (0, "embed") if name == "tok_embeddings.weight" else (self.pp - 1, "output")
            )
            full = torch.cat(self._get(stage, key), dim=0)  # [padded vocab, dim]
            if self.padded_vocab and full.shape[0] != self.padded_vocab:
                raise CheckpointError(
                    f"{self.iter_dir}: {key} has {full.shape[0]} rows, "
                    f"args say padded_vocab_size {self.padded_vocab}"
                )
            return full[: c.vocab_size].float()
        if name == "norm.weight":
            return self._get(self.pp - 1, "final_norm")[0].float()
        layer = int(name.split(".")[1])
        stage, local = divmod(layer, per_stage)
        rest = name.split(".", 2)[2]
        key = f"{local}."
        if rest == "attention_norm.weight":
            return self._get(stage, key + "attn_norm")[0].float()
        if rest == "ffn_norm.weight":
            return self._get(stage, key + "mlp_norm")[0].float()
        if rest == "attention.wo.weight":
            return torch.cat(self._get(stage, key + "proj"), dim=1).float()
        if rest == "feed_forward.w2.weight":
            return torch.cat(self._get(stage, key + "fc2"), dim=1).float()
        if rest == "feed_forward.w13.weight":
            halves = [t.chunk(2, dim=0) for t in self._get(stage, key + "fc1")]
            gate = torch.cat([h[0] for h in halves])
            up = torch.cat([h[1] for h in halves])
            return torch.cat([gate, up]).float()
        if rest == "attention.wqkv.weight":
            return self._qkv(torch.cat(self._get(stage, key + "qkv"), dim=0)).float()
        raise KeyError(name)

    def _qkv(self, w: torch.Tensor) -> torch.Tensor:
        """[groups x (q_per_group + 2) x D, dim] grouped -> [q; k; v] (ours)."""
        c = self.config
        d, g = c.head_dim, c.n_kv_heads
        qpg = c.n_heads // g
        w = w.view(g, qpg + 2, d, c.dim)  # [G, q/G + 2, D, dim]
        q = w[:, :qpg].reshape(c.n_heads * d, c.dim)
        k = w[:, qpg].reshape(g * d, c.dim)
        v = w[:, qpg + 1].reshape(g * d, c.dim)
        return torch.cat([q, k, v])

    def tokenizer(self) -> Any:
        return self._tokenizer

    def source_info(self) -> dict[str, Any]:
        return {
            "format": "megatron",
            "path": self.root.name,
            "tp": self.tp,
            "pp": self.pp,
            "iteration": self.iter_dir.name,
        }
