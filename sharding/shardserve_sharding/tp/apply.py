"""Cut a plain model for one TP rank, following the split table (the model code never changes).

    model = build_model(family, config)                       # full model, or on "meta"
    apply_tensor_parallel(model, comm)                         # this rank's layers and slices

Each parameter's kind (split_table) picks the parallel layer that replaces its module; its
ShardSpec (partition) says which rows or columns this rank keeps. With a full model the slices
are cut from its weights; with a meta model the local parameters are left empty for
load_tp_state to fill from a rank file (or from slice reads of any other layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..partition import (
    ShardSpec,
    TPGeometry,
    kv_heads_per_rank,
    local_shape,
    shard_spec,
    shard_tensor,
)
from ..split_table import SplitKind, split_kind
from .comm import Comm
from .layers import (
    ColumnParallelConv1d,
    ColumnParallelLinear,
    ReplicatedRows,
    RowParallelLinear,
    VocabParallelEmbedding,
)

_COLUMN_KINDS = (SplitKind.COLWISE, SplitKind.FUSED_QKV, SplitKind.FUSED_HALVES)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def apply_tensor_parallel(model: nn.Module, comm: Comm) -> nn.Module:
    """Replace model's split modules in place by parallel layers holding rank comm.rank's slice."""
    geo = TPGeometry.of(model.family, model.config)
    real = not any(p.is_meta for p in model.parameters())
    tied = bool(getattr(model.config, "tie_embeddings", False))
    embedding: VocabParallelEmbedding | None = None
    for name, param in _split_parameters(model):
        parent, attr = _parent(model, name.rsplit(".", 1)[0])
        old = getattr(parent, attr)
        kind = split_kind(model.family, name)
        spec = shard_spec(kind, tuple(param.shape), geo, comm.world_size, comm.rank)
        new = _parallel_layer(kind, name, param, old, spec, geo, comm)
        if isinstance(new, VocabParallelEmbedding):
            embedding = new
        if tied and isinstance(new, ColumnParallelLinear) and kind is SplitKind.VOCAB \
                and embedding is not None:
            new.weight = embedding.weight  # the local vocab rows are the same rows
        elif real:
            _copy_slices(model.family, name, param, old, new, spec, geo, comm)
        setattr(parent, attr, new)
    _set_local_heads(model, geo, comm.world_size)
    model.tp_comm = comm
    return model


def _split_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights the split table cuts (tied ones listed twice, biases left to their weight)."""
    return [(name, p) for name, p in model.named_parameters(remove_duplicate=False)
            if split_kind(model.family, name) is not SplitKind.REPLICATED
            and not name.endswith(".bias")]


def _parallel_layer(kind: SplitKind, name: str, param: nn.Parameter, old: nn.Module,
                    spec: ShardSpec, geo: TPGeometry, comm: Comm) -> nn.Module:
    """The parallel layer that replaces `old` (which holds weight `name`, cut as `kind`), empty,
    sized for this rank's slice `spec` (on the meta device when param is)."""
    lshape = local_shape(tuple(param.shape), spec)
    n_local = lshape[1] if kind is SplitKind.ROWWISE else lshape[0]
    kw = {"dtype": param.dtype, "device": "meta" if param.is_meta else param.device}
    bias = getattr(old, "bias", None) is not None
    if kind is SplitKind.VOCAB and isinstance(old, nn.Embedding):
        return VocabParallelEmbedding(
            n_local, param.shape[1], comm, vocab_start=comm.rank * n_local, **kw
        )
    if kind is SplitKind.VOCAB:
        return ColumnParallelLinear(
            param.shape[1], n_local, comm, gather_output=True, output_size=param.shape[0], **kw
        )
    if kind in _COLUMN_KINDS and isinstance(old, nn.Conv1d):
        return ColumnParallelConv1d(
            old.in_channels, n_local, old.kernel_size[0], comm, bias=bias, **kw
        )
    if kind in _COLUMN_KINDS:
        return ColumnParallelLinear(
            param.shape[1],
            n_local,
            comm,
            bias=bias,
            replicated_rows=_replicated_kv_rows(kind, spec, geo, comm.world_size),
            **kw,
        )
    if kind is SplitKind.ROWWISE:
        return RowParallelLinear(n_local, param.shape[0], comm, bias=bias, **kw)
    raise ValueError(f"{name}: no parallel layer for kind {kind.value}")


def _copy_slices(family: str, name: str, param: nn.Parameter, old: nn.Module, new: nn.Module,
                 spec: ShardSpec, geo: TPGeometry, comm: Comm) -> None:
    """Fill new's weight (and bias) with this rank's slice of a full model's old module."""
    with torch.no_grad():
        new.weight.copy_(shard_tensor(param.data, spec))
        if getattr(old, "bias", None) is not None:
            bias_kind = split_kind(family, name[: -len("weight")] + "bias")
            bspec = shard_spec(bias_kind, tuple(old.bias.shape), geo, comm.world_size, comm.rank)
            new.bias.copy_(shard_tensor(old.bias.data, bspec))


def _set_local_heads(model: nn.Module, geo: TPGeometry, tp: int) -> None:
    """Tell attention modules how many query and KV heads this rank holds."""
    for mod in model.modules():
        if hasattr(mod, "set_local_heads"):
            mod.set_local_heads(geo.n_heads // tp, kv_heads_per_rank(geo.n_kv_heads, tp))


def _replicated_kv_rows(
    kind: SplitKind, spec: ShardSpec, geo: TPGeometry, tp: int
) -> ReplicatedRows | None:
    """The K and V rows of a fused QKV slice when tp > KV heads (each head on tp/Hkv ranks)."""
    if kind is not SplitKind.FUSED_QKV or tp <= geo.n_kv_heads:
        return None
    (qa, qb), (ka, kb), (va, _) = spec.pieces
    k0 = geo.n_heads * geo.head_dim  # global row where the K heads start
    q_len = qb - qa
    return ReplicatedRows(
        pairs=((q_len, ka - k0), (q_len + kb - ka, va - k0)),
        size=kb - ka,
        total=2 * geo.n_kv_heads * geo.head_dim,
    )


def load_tp_state(model: nn.Module, state: dict[str, torch.Tensor], *, dtype: Any = None) -> None:
    """Assign this rank's local tensors (names as in the checkpoint) to a TP-applied model."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    tied = bool(getattr(model.config, "tie_embeddings", False))
    if tied:
        missing = [m for m in missing if m != "output.weight"]
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"rank state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, t in state.items():
        parent, attr = _parent(model, name)
        old = getattr(parent, attr)
        if tuple(old.shape) != tuple(t.shape):
            raise ValueError(
                f"{name}: local shape {list(t.shape)}, model expects {list(old.shape)}"
            )
        setattr(parent, attr, nn.Parameter(t.to(dtype or t.dtype), requires_grad=False))
    retie_embeddings(model)


def retie_embeddings(model: nn.Module) -> None:
    """With tie_embeddings, make the output weight the embedding's again (loading weights by
    assignment replaces the embedding's parameter and leaves the output holding the old one)."""
    if getattr(model.config, "tie_embeddings", False):
        model.output.weight = model.tok_embeddings.weight
