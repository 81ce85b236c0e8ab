"""`shardserve export-onnx MODEL_DIR OUT_DIR [--dtype fp32|int8] [--opset N]`.

The checkpoint (any layout: tensors are merged while reading) becomes one fp32 model, written
by the family's ModelSpec.onnx_export: the Llama family as the hand-written step graph of
llama_graph.py (opset 23), the conv LM as the step of graphs.py exported with torch.onnx (see
export_torch_step), a state-slot family with its state as explicit inputs and outputs;
dynamic batch, step length and cache length;
weights as external data, a tied embedding stored once. The result is checked before
anything is written: ONNX Runtime and torch run the same random prompts (ragged prefill, then
several decode steps, through the paged cache) and export fails if logits differ by more than
1e-4 x max|torch|.
With --dtype int8 the weights are also quantized dynamically (onnxruntime.quantization) and
the quality cost is measured (logit error, top-1 agreement, perplexity on a held text).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.atomic import atomic_directory, atomic_write_text
from ..checkpoint.manifest import CheckpointError
from ..checkpoint.source import ShardserveSource
from ..models import CacheKind, StateSlotSpec, model_spec

HELD_TEXT = (
    "The history of computing is a story of layers. Each generation of engineers built on the "
    "tools of the last, hiding complexity behind simpler interfaces. A modern language model "
    "runs on libraries that call kernels that drive hardware designed decades after the first "
    "compilers were written, and yet the ideas are familiar: store, load, multiply, add."
)


@dataclass
class ExportReport:
    out: Path
    seconds: float
    max_rel_err: float
    int8: dict[str, float] | None = None


def load_full_model(model_dir: str | Path, *, verify_hashes: bool = True
                    ) -> tuple[torch.nn.Module, ShardserveSource]:
    from ..materialize import materialize

    src = ShardserveSource(model_dir, verify_hashes=verify_hashes)
    if src.quant is not None:
        raise CheckpointError(f"{model_dir}: the ONNX export reads float weights; this checkpoint "
                              f"is {src.quant.scheme}-quantized (export its float source)")
    state = {n: src.tensor(n).float() for n, _ in src.names_and_shapes()}
    return materialize(src.family, src.config, state).float(), src


def export_torch_step(step: torch.nn.Module, model: torch.nn.Module, cache: StateSlotSpec,
                      path: Path, opset: int) -> int:
    """Write model.onnx (+ model.onnx.data) by the TorchScript export of a state-slot step
    module, step(tokens [B, T], state [L, B, *state_shape], num_new [B], logits_index [B]) ->
    (logits [B, V], new_state [L, B, *state_shape]) (in a scratch folder, then moved).
    Returns the number of tied initializers merged."""
    names = ["tokens", "state", "num_new", "logits_index"]
    outs = ["logits", "new_state"]
    axes = {"tokens": {0: "batch", 1: "step"}, "state": {1: "batch"},
            "num_new": {0: "batch"}, "logits_index": {0: "batch"}, "logits": {0: "batch"},
            "new_state": {1: "batch"}}
    b, t = 2, 3
    args = (torch.randint(0, model.config.vocab_size, (b, t)),
            torch.zeros(cache.n_layers, b, *cache.state_shape), torch.tensor([t, 1]),
            torch.tensor([t - 1, 0]))
    scratch = Path(tempfile.mkdtemp(dir=path.parent))
    with torch.no_grad():
        torch.onnx.export(step, args, str(scratch / path.name), input_names=names,
                          output_names=outs, dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=False)  # keeps a tied weight single
    shutil.move(str(scratch / path.name), path)
    shutil.rmtree(scratch, ignore_errors=True)
    return _externalize(path)


def _externalize(path: Path) -> int:
    """Re-save with large weights as external data and tied (duplicate) initializers merged."""
    import onnx

    m = onnx.load(str(path))
    seen: dict[bytes, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in m.graph.initializer:
        key = init.raw_data if init.raw_data and len(init.raw_data) > 4096 else None
        if key is not None and key in seen and init.dims == _dims(m, seen[key]):
            rename[init.name] = seen[key]
            continue
        if key is not None:
            seen[key] = init.name
        keep.append(init)
    if rename:
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        for node in m.graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    data = path.name + ".data"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return len(rename)


def _dims(m: Any, name: str) -> list[int]:
    for init in m.graph.initializer:
        if init.name == name:
            return list(init.dims)
    return []


def _meta(model: torch.nn.Module, family: str, model_file: str) -> dict[str, Any]:
    cfg = model.config
    spec = model_spec(family)
    d: dict[str, Any] = {"family": family, "model_file": model_file,
                         "n_layers": len(model.layers), "vocab_size": cfg.vocab_size,
                         "config": cfg.to_dict(), "cache": spec.cache_kind.value}
    cache = spec.cache_spec(model)
    if isinstance(cache, StateSlotSpec):
        d["state_shape"] = list(cache.state_shape)
    d.update(spec.onnx_meta(model))
    return d


def verify(model: torch.nn.Module, family: str, onnx_dir: Path, model_file: str,
           steps: int = 4, seed: int = 0) -> tuple[float, list[np.ndarray], list[torch.Tensor]]:
    """Ragged prefill + decode steps through ORT (paged) and torch; max relative error."""
    from .runtime import OnnxStepRuntime

    g = torch.Generator().manual_seed(seed)
    lens = [5, 2, 7]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lens]
    rt = OnnxStepRuntime(onnx_dir, kv_cache_tokens=256, block_size=4, max_slots=8,
                         model_file=model_file)
    b = len(lens)
    width = max(lens)
    tokens = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = torch.arange(width).expand(b, width).contiguous()
    num_new = torch.tensor(lens)
    blocks_per = -(-(width + steps) // 4)
    tables = torch.arange(b * blocks_per).view(b, blocks_per)  # disjoint blocks per row
    if model_spec(family).cache_kind is CacheKind.STATE_SLOT:
        tables = torch.arange(b)[:, None]  # one state slot per row
    cache = model.new_cache(b, width + steps, dtype=torch.float32, device="cpu")
    errs, outs_o, outs_t = [], [], []
    with torch.no_grad():
        for step in range(steps + 1):
            cache.begin_step(positions, num_new)
            ref = model(tokens, positions, cache, num_new - 1)  # [B, V]
            got = rt.forward(tokens.numpy(), positions.numpy(), num_new.numpy(),
                             (num_new - 1).numpy(), tables.numpy())
            errs.append(float(np.abs(got - ref.numpy()).max() / ref.abs().max()))
            outs_o.append(got)
            outs_t.append(ref)
            nxt = ref.argmax(-1)
            positions = (positions[:, :1] * 0 + torch.tensor(lens)[:, None] + step)
            tokens, num_new = nxt[:, None], torch.ones(b, dtype=torch.long)
    return max(errs), outs_o, outs_t


def _perplexity(onnx_dir: Path, model_file: str, ids: list[int]) -> float:
    from .runtime import OnnxStepRuntime

    rt = OnnxStepRuntime(onnx_dir, kv_cache_tokens=1024, block_size=16, max_slots=2,
                         model_file=model_file)
    t = np.array([ids[:-1]], dtype=np.int64)
    n = t.shape[1]
    nll = 0.0
    tables = np.arange(-(-n // 16))[None, :].astype(np.int64)
    if model_spec(rt.family).cache_kind is CacheKind.STATE_SLOT:
        tables = np.zeros((1, 1), dtype=np.int64)
    for i in range(n):  # one token per step: exercises decode, as served
        logits = rt.forward(t[:, i : i + 1], np.array([[i]]), np.array([1]), np.array([0]),
                            tables)
        lp = logits[0] - logits[0].max()
        lp = lp - math.log(np.exp(lp).sum())
        nll -= lp[ids[i + 1]]
    return math.exp(nll / n)


def export_onnx(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                dtype: str = "fp32", opset: int | None = None, tolerance: float = 1e-4,
                overwrite: bool = False, verify_hashes: bool = True) -> ExportReport:
    """Export, verify against torch and (with dtype="int8") quantize. opset defaults to 23 for
    the Llama graph (its minimum) and 17 for the conv LM's TorchScript export (the family's
    ModelSpec.onnx_opset)."""
    if dtype not in ("fp32", "int8"):
        raise ValueError(f"--dtype must be fp32 or int8, got {dtype!r}")
    t0 = time.perf_counter()
    model, src = load_full_model(model_dir, verify_hashes=verify_hashes)
    family = src.family
    spec = model_spec(family)
    if opset is None:
        opset = spec.onnx_opset
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        merged = spec.onnx_export(model, tmp / "model.onnx", opset)
        meta = _meta(model, family, "model.onnx")
        meta.update(opset=opset, tied_initializers_merged=merged, source=src.source_info())
        atomic_write_text(tmp / "onnx_model.json", json.dumps(meta, indent=1))
        err, _, _ = verify(model, family, tmp, "model.onnx")
        if not err <= tolerance:
            raise CheckpointError(f"{out_dir}: ONNX logits differ from torch by {err:.3g} "
                                  f"(relative), tolerance {tolerance:g}; nothing written")
        meta["verified_max_rel_err"] = err
        int8 = None
        if dtype == "int8":
            int8 = _quantize(tmp, src, meta)
            meta["int8"] = int8
            meta["model_file"] = "model.int8.onnx"
        atomic_write_text(tmp / "onnx_model.json", json.dumps(meta, indent=1))
        tok = src.tokenizer()
        if tok is not None:
            (tmp / "tokenizer").mkdir()
            tok.save(tmp / "tokenizer")
        shutil.copyfile(src.root / "manifest.json", tmp / "source_manifest.json")
    return ExportReport(Path(out_dir), time.perf_counter() - t0, err, int8)


def _quantize(tmp: Path, src: ShardserveSource, meta: dict[str, Any]) -> dict[str, float]:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only the weight GEMMs are quantized (the quantizer takes opset 23's Attention for ORT's
    # older contrib Attention). ONNX shape inference does not type the outputs of ORT's
    # contrib ops (fused RMSNorm): every activation in these graphs is fp32.
    quantize_dynamic(str(tmp / "model.onnx"), str(tmp / "model.int8.onnx"),
                     weight_type=QuantType.QInt8, use_external_data_format=False,
                     op_types_to_quantize=["MatMul", "Gemm"],
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    tok = src.tokenizer()
    ids = tok.encode(HELD_TEXT) if tok is not None else list(range(64))
    ids = [i % meta["vocab_size"] for i in ids][:96]
    ppl_fp32 = _perplexity(tmp, "model.onnx", ids)
    ppl_int8 = _perplexity(tmp, "model.int8.onnx", ids)
    model_int8_meta = dict(meta)
    del model_int8_meta
    return {"perplexity_fp32": ppl_fp32, "perplexity_int8": ppl_int8,
            "perplexity_ratio": ppl_int8 / ppl_fp32,
            "size_mb": (tmp / "model.int8.onnx").stat().st_size / 1e6}
