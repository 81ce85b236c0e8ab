"""Wire quantized weights into a tensor-parallel-applied model (the model code stays plain).

    model = build_model(...); apply_tensor_parallel(model, comm)      # meta or real
    rest = install_quantized(model, state, qcfg, dtype)               # rank-local tensors
    load_tp_state(model, rest)                                        # norms, float weights

For each quantized weight the owning module (a TP linear layer, or the vocabulary embedding)
gets `weight = None` and a `qweight` (quant/kernels.py) built from this rank's stored tensors;
models.cpu_gemm.cpu_linear and tp.layers.VocabParallelEmbedding call it. A tied lm_head shares
the embedding's Int8Weight: one int8 copy of the matrix serves both the lookup and the
output projection.

`quantize_state` turns float tensors (global, or a rank's rows) into stored tensors: every
row and group is quantized on its own, so quantizing a slice of rows gives exactly that slice
of the quantized global tensor (scheme.py says what a rowwise int8 slice needs besides).
"""

from __future__ import annotations

import torch
from torch import nn

from ..split_table import GROUP_SCALE_SUFFIX, QPARAMS_SUFFIX, SCALE_SUFFIX
from .kernels import Int4Weight, Int8Weight
from .scheme import QuantConfig, quantize_weight


def quantize_state(state: dict[str, torch.Tensor], qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Float tensors (names as in a checkpoint) -> the stored tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        out.update(quantize_weight(name, t, qcfg))
    return out


def install_quantized(model: nn.Module, state: dict[str, torch.Tensor], qcfg: QuantConfig,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace every quantized weight of `model` by its kernel module; returns the tensors of
    `state` left for load_tp_state (norms and float weights)."""
    rest = dict(state)
    built: dict[str, nn.Module] = {}
    for name in list(state):
        scheme = qcfg.scheme_of(name)
        if scheme is None or name not in rest:
            continue
        q = rest.pop(name)
        if scheme == "int8":
            expect = torch.int8
            suffix = GROUP_SCALE_SUFFIX if qcfg.group_of(name) else SCALE_SUFFIX
            qweight: nn.Module = Int8Weight(q, _pop(rest, name + suffix), dtype)
        else:
            expect = torch.uint8
            qweight = Int4Weight(q, _pop(rest, name + QPARAMS_SUFFIX), dtype)
        if q.dtype != expect:
            raise ValueError(f"{name}: stored as {q.dtype}, {scheme} needs {expect}")
        _attach(model, name, qweight)
        built[name] = qweight
    if getattr(model.config, "tie_embeddings", False) and "tok_embeddings.weight" in built:
        _attach(model, "output.weight", built["tok_embeddings.weight"])
    return rest


def _pop(rest: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in rest:
        raise ValueError(f"quantized checkpoint lacks {name}")
    return rest.pop(name)


def _attach(model: nn.Module, name: str, qweight: nn.Module) -> None:
    """Module owning parameter `name` computes with qweight from now on (its weight is None)."""
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    old = getattr(owner, "weight", None)
    if old is not None and tuple(old.shape) != (qweight.out_features, qweight.in_features):
        raise ValueError(f"{name}: quantized as [{qweight.out_features}, "
                         f"{qweight.in_features}], the layer expects {list(old.shape)}")
    owner.weight = None
    owner.qweight = qweight


def check_quantized_tp(family: str, config, stored: list[tuple[str, tuple[int, ...]]],
                       qcfg: QuantConfig, tp: int) -> None:
    """ValueError naming the tensor when `tp` cannot cut a stored quantized tensor (an int4
    group would straddle two ranks' input columns: the TP slice must hold whole groups)."""
    from ..partition import TPGeometry, shard_spec
    from ..split_table import split_kind

    geo = TPGeometry.of(family, config)
    for name, shape in stored:
        try:
            shard_spec(split_kind(family, name), shape, geo, tp, 0)
        except ValueError as e:
            what = f"{qcfg.scheme} group size {qcfg.group_size}"
            raise ValueError(f"tp {tp} cannot split {name} {list(shape)} of this {what} "
                             f"checkpoint ({e}): each rank must hold whole groups") from None
