"""One way to turn a config and a state dict into a ready model: materialize().

    build on the meta device (nothing allocated or initialised)
    -> [comm: cut for this TP rank (tp/apply.py), wire in quantized kernels (quant/apply.py)]
    -> load the state (assigned, not copied)
    -> re-tie a tied output weight to the embedding (loading by assignment unties them)
    -> recompute non-persistent buffers (Llama's rotary tables) -> eval mode

Used by load_model (checkpoint/io.py), load_sharded_model (sharded_load.py), the resharder's
verification (reshard_verify.py) and the ONNX export (onnx_export/export.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint.manifest import CheckpointError
from .tp.apply import apply_tensor_parallel, load_tp_state, retie_embeddings
from .tp.comm import Comm


def materialize(family: str, config: Any, state: dict[str, torch.Tensor], *,
                dtype: torch.dtype = torch.float32, device: str = "cpu",
                comm: Comm | None = None, quant: Any = None,
                where: str | os.PathLike[str] = "checkpoint") -> nn.Module:
    """The model of `family` for `config` holding `state` (cast to dtype), in eval mode.

    Without comm: the whole model on `device`, state holding every checkpoint tensor. With
    comm: rank comm.rank's TP slice (on the CPU), state holding that rank's local tensors;
    quant (a QuantConfig) wires in its int8 / int4 modules first (integers keep their dtype;
    a state that does not fit raises CheckpointError naming `where`).
    """
    from .models import build_model

    with torch.device("meta"):
        model = build_model(family, config)
    if comm is None:
        model = model.to_empty(device=device)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                              assign=True)
        model.to(dtype)
        retie_embeddings(model)
    else:
        apply_tensor_parallel(model, comm)
        if quant is not None:
            from .quant.apply import install_quantized

            try:
                state = install_quantized(model, state, quant, dtype)
            except ValueError as e:
                raise CheckpointError(f"{where}: {e}") from None
        load_tp_state(model, {k: v.to(dtype) for k, v in state.items()})  # re-ties
    if hasattr(model, "reset_buffers"):  # families with non-persistent buffers define it
        model.reset_buffers()
    return model.eval()
