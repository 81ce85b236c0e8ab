"""Stage 1 of `shardserve reshard`: the plan (which tensors, their cuts, their dtypes).

plan_reshard reads only the source's names, shapes and metadata: it checks the target layout
against the model, settles the output dtype, the tokenizer to store and the quantization
(quantize float weights here, keep a quantized source's integers, or take a GGUF's own Q4
blocks), and lists every stored tensor with its pipeline stage and one ShardSpec per target
TP rank. Nothing is read or written; reshard_write.write_checkpoint carries the plan out.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint.io import DTYPES
from .checkpoint.manifest import CheckpointError, Layout
from .checkpoint.reader import CheckpointSource
from .checkpoint.safetensors_stream import TensorSpec
from .checkpoint.source import ShardserveSource
from .partition import (
    ShardSpec,
    TPGeometry,
    check_tp,
    local_shape,
    shard_spec,
    stage_layers,
    tensor_stage,
)
from .quant.scheme import QuantConfig, stored_tensors
from .split_table import split_kind


@dataclass(frozen=True)
class PlannedTensor:
    """One stored tensor of the destination and how it is cut."""

    name: str
    shape: tuple[int, ...]  # global
    dtype: torch.dtype  # as stored
    stage: int  # pipeline stage whose files hold it
    specs: tuple[ShardSpec, ...]  # one per target TP rank
    float_source: str | None  # the source tensor of the same name (None: a quantized companion)


@dataclass(frozen=True)
class ReshardPlan:
    """Everything the write stage needs, decided before any tensor is read."""

    family: str
    config: Any
    layout: Layout
    dtype: torch.dtype  # the destination's float dtype
    quant: QuantConfig | None  # the destination's quantization
    requantize: bool  # float weights are quantized here
    gguf_blocks: bool  # ... by taking the GGUF's own Q4 blocks
    tensors: tuple[PlannedTensor, ...]
    tokenizer: Any  # a TokenizerBundle to save, or None
    tokenizer_dir: Path | None  # our own format's tokenizer files, copied as they are

    def file_specs(self) -> dict[tuple[int, int], list[TensorSpec]]:
        """(tp rank, pp stage) -> the TensorSpecs of that rank file, in plan order."""
        tp, pp = self.layout.tp, self.layout.pp
        files: dict[tuple[int, int], list[TensorSpec]] = {
            (t, s): [] for t in range(tp) for s in range(pp)
        }
        for p in self.tensors:
            for t in range(tp):
                files[(t, p.stage)].append(TensorSpec(p.name, p.dtype,
                                                      local_shape(p.shape, p.specs[t])))
        return files


def plan_reshard(source: CheckpointSource, src: str | os.PathLike[str], *, tp: int, pp: int,
                 dtype: str | None, given_tokenizer: Any, tokenizer_path: Any,
                 quantize: str | None, group_size: int, quantize_embedding: str) -> ReshardPlan:
    """The plan for writing `source` (opened from src) at layout (tp, pp); raises
    CheckpointError (or ValueError for a layout the model cannot take) before any write."""
    family, mcfg = source.family, source.config
    check_tp(family, mcfg, tp)
    stage_layers(mcfg.n_layers, pp)  # validates pp
    out_dtype = DTYPES[{"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)] if dtype \
        else source.dtype
    tok, tok_dir = _plan_tokenizer(source, src, given_tokenizer, tokenizer_path)
    qcfg, requantize = _quant_plan(source, quantize, group_size, quantize_embedding, src)
    blocks = requantize and _gguf_blocks_apply(source, qcfg)
    if blocks:  # the GGUF's own Q4 blocks are the int4 g32 weights (quant/gguf_blocks.py)
        from .quant.gguf_blocks import gguf_block_types

        qcfg = dataclasses.replace(qcfg, origin="gguf:" + "+".join(
            sorted(gguf_block_types(source))))
    stored = []  # (stored name, global shape, dtype, float source name)
    for name, shape in source.names_and_shapes():
        if requantize:
            stored += [(*t, name) for t in stored_tensors(name, tuple(shape), out_dtype, qcfg)]
        else:
            stored.append((name, tuple(shape), _stored_dtype(source, name, out_dtype), name))
    if qcfg is not None:
        from .quant.apply import check_quantized_tp

        check_quantized_tp(family, mcfg, [(t[0], t[1]) for t in stored], qcfg, tp)
    geo = TPGeometry.of(family, mcfg)
    tensors = tuple(
        PlannedTensor(sname, sshape, sdtype, tensor_stage(name, mcfg.n_layers, pp),
                      tuple(shard_spec(split_kind(family, sname), sshape, geo, tp, r)
                            for r in range(tp)),
                      name if sname == name else None)
        for sname, sshape, sdtype, name in stored
    )
    return ReshardPlan(family, mcfg, Layout(tp, pp), out_dtype, qcfg, requantize, bool(blocks),
                       tensors, tok, tok_dir)


def _plan_tokenizer(source: CheckpointSource, src: Any, given: Any, path: Any
                    ) -> tuple[Any, Path | None]:
    """(a tokenizer to save, or our own format's tokenizer folder to copy as it is)."""
    tok_dir = None
    if given is None and isinstance(source, ShardserveSource) and source.manifest.tokenizer:
        tok_dir = source.root / source.manifest.tokenizer  # checked when first written
    tok = given if given is not None or tok_dir else source.tokenizer()
    if tok is not None and tok.vocab_size > source.config.vocab_size:
        raise CheckpointError(
            f"{path or src}: tokenizer has {tok.vocab_size} tokens but the model's "
            f"vocabulary has {source.config.vocab_size} rows"
        )
    return tok, tok_dir


def _quant_plan(source: CheckpointSource, quantize: str | None, group_size: int, embedding: str,
                src: Any) -> tuple[QuantConfig | None, bool]:
    """(the destination's QuantConfig or None, whether float weights are quantized here)."""
    have = source.quant
    if quantize is None:
        return have, False
    from .models import model_spec

    if not model_spec(source.family).quantizable:
        raise CheckpointError(f"{src}: --quantize supports the Llama family only; this "
                              f"checkpoint is {source.family!r}")
    want = QuantConfig(quantize, group_size, embedding)
    if have is None:
        return want, True
    if (have.scheme, have.group_size, have.embedding) != (want.scheme, want.group_size,
                                                         want.embedding):
        raise CheckpointError(
            f"{src}: already quantized ({have.scheme}, group {have.group_size}, embedding "
            f"{have.embedding}); reshard it without --quantize, or quantize a float checkpoint")
    return have, False


def _gguf_blocks_apply(source: CheckpointSource, qcfg: QuantConfig) -> bool:
    """int4 g32 from a GGUF whose linear weights are all Q4_0 / Q4_1: take the blocks."""
    from .importers.gguf_reader import GGUFLlamaSource

    if not isinstance(source, GGUFLlamaSource) or (qcfg.scheme, qcfg.group_size) != ("int4", 32):
        return False
    from .quant.gguf_blocks import TYPES, gguf_block_types

    return gguf_block_types(source) <= set(TYPES)


def _stored_dtype(source: CheckpointSource, name: str, out_dtype: torch.dtype) -> torch.dtype:
    """A quantized source's integers and scales keep their dtype; floats become out_dtype."""
    if source.quant is not None:
        from .quant.scheme import component_of

        base, suffix = component_of(name)
        if suffix or source.quant.scheme_of(base):
            return source.tensor_dtype(name)
    return out_dtype
