"""`shardserve export-hf MODEL_DIR OUT_DIR [--dtype fp32|bf16]`: a Hugging Face directory.

From a Llama-family shardserve checkpoint of any TP x PP layout (each tensor merged from the
rank files that hold it, one at a time) this writes what transformers' `LlamaForCausalLM` and
vLLM load: config.json (`architectures: ["LlamaForCausalLM"]`), model.safetensors (Q, K, V
and gate, up unfused; a tied output weight stored once, as transformers does),
generation_config.json, tokenizer.json and tokenizer_config.json with the chat template.
Names come from the importer's own table (`importers.hf_reader.hf_names`), inverted here.

The directory is built under a temporary name and renamed when complete, after a check: the
HF importer reads it back and every tensor must equal the checkpoint's (cast to the output
dtype) bit for bit, and the config must map back to the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint.atomic import atomic_directory, atomic_write_text
from .checkpoint.io import DTYPES
from .checkpoint.manifest import CheckpointError
from .checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec
from .checkpoint.source import ShardserveSource
from .importers.hf_reader import HFLlamaSource, hf_names, hf_rows
from .models.llama import LlamaConfig

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32",
                 "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class HFExportReport:
    out: Path
    seconds: float
    bytes_written: int
    tensors: int
    dtype: str


def hf_config_dict(cfg: LlamaConfig, tok: Any, dtype: str) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM (read back by `hf_llama_config`)."""
    eos = list(tok.eos_token_ids) if tok is not None else []
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; older readers (and vLLM's) rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.bos_token_id if tok is not None else None,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": tok.pad_token_id if tok is not None else None,
        "dtype": dtype,
        "use_cache": True,
    }


def generation_config_dict(tok: Any) -> dict[str, Any]:
    """generation_config.json: token ids only (no sampling defaults for a server to inherit)."""
    eos = list(tok.eos_token_ids)
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": tok.pad_token_id,
    }


def hf_tokenizer(tok: Any) -> Any:
    """The bundle as HF readers expect it: where we prepend BOS ourselves (add_bos_token), the
    tokenizer.json's own post-processor does it too, since a HF reader may only apply that."""
    from tokenizers import Tokenizer, processors

    if not tok.add_bos_token or tok.bos_token_id is None:
        return tok
    if tok.tokenizer.encode("", add_special_tokens=True).ids[:1] == [tok.bos_token_id]:
        return tok  # its post-processor adds BOS already
    inner = Tokenizer.from_str(tok.tokenizer.to_str())
    bos = tok.token(tok.bos_token_id)
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.bos_token_id)])
    return dataclasses.replace(tok, tokenizer=inner)


def _plan(source: ShardserveSource) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Every checkpoint tensor with its HF parts: (our name, [(HF name, first row, end row)])."""
    plan = []
    for name, shape in source.names_and_shapes():
        names = hf_names(name)
        rows = hf_rows(name, source.config) or (shape[0],)
        if len(rows) != len(names) or sum(rows) != shape[0]:
            raise CheckpointError(f"{source.root}: {name} {list(shape)} does not split into "
                                  f"{names} of rows {rows}")
        bounds = [sum(rows[:i]) for i in range(len(rows) + 1)]
        plan.append((name, [(hf, bounds[i], bounds[i + 1]) for i, hf in enumerate(names)]))
    return plan


def export_hf(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    verify_hashes: bool = True,
) -> HFExportReport:
    """Write the checkpoint at model_dir as a Hugging Face directory out_dir (see the module).

    dtype: "fp32" or "bf16" (default: the checkpoint's). Raises CheckpointError for a family
    other than Llama or a checkpoint without a tokenizer.
    """
    t0 = time.perf_counter()
    source = ShardserveSource(model_dir, verify_hashes=verify_hashes)
    try:
        if source.family != "llama":
            raise CheckpointError(f"{model_dir}: export-hf supports the Llama family only; this "
                                  f"checkpoint is {source.family!r}")
        if source.quant is not None:
            raise CheckpointError(f"{model_dir}: export-hf writes float weights; this checkpoint "
                                  f"is {source.quant.scheme}-quantized (export its float source)")
        tok = source.tokenizer()
        if tok is None:
            raise CheckpointError(f"{model_dir}: the checkpoint has no tokenizer; a Hugging Face "
                                  "directory needs one")
        if dtype is not None and dtype not in DTYPE_ALIASES:
            raise ValueError(f"dtype {dtype!r}: expected one of fp32, bf16")
        dname = DTYPE_ALIASES[dtype] if dtype else DTYPE_ALIASES.get(source.manifest.dtype,
                                                                      source.manifest.dtype)
        out_dtype = DTYPES[dname]
        plan = _plan(source)
        shapes = dict(source.names_and_shapes())
        specs = [TensorSpec(hf, out_dtype, (r1 - r0, *shapes[name][1:]))
                 for name, parts in plan for hf, r0, r1 in parts]
        config = hf_config_dict(source.config, tok, dname)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            writer = SafetensorsStreamWriter(tmp / "model.safetensors", specs,
                                             metadata={"format": "pt"})
            try:
                items = plan
                if progress:
                    from tqdm import tqdm

                    items = tqdm(plan, desc="export-hf", unit="tensor")
                for name, parts in items:
                    full = source.tensor(name).to(out_dtype)
                    for hf, r0, r1 in parts:
                        writer.write(hf, full[r0:r1])
                writer.close()
            except BaseException:
                writer.abort()
                raise
            atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
            atomic_write_text(tmp / "generation_config.json",
                              json.dumps(generation_config_dict(tok), indent=2) + "\n")
            hf_tokenizer(tok).save(tmp)
            _check(source, tmp, out_dtype)
        written = sum(p.stat().st_size for p in Path(out_dir).iterdir() if p.is_file())
        return HFExportReport(Path(out_dir), time.perf_counter() - t0, written, len(specs), dname)
    finally:
        source.close()


def _check(source: ShardserveSource, directory: Path, out_dtype: torch.dtype) -> None:
    """The HF importer reads `directory` back to the same config and the same tensors."""
    back = HFLlamaSource(directory)
    if back.config != source.config:
        raise CheckpointError(f"{directory}: config.json reads back as {back.config}, not "
                              f"{source.config}")
    for name, _ in source.names_and_shapes():
        want = source.tensor(name).to(out_dtype).float()
        if not torch.equal(back.tensor(name), want):
            raise CheckpointError(f"{directory}: {name} does not read back as written")
