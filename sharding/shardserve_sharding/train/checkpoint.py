"""Training checkpoints: the shardserve format at the training layout, plus optimizer state.

    OUT/step_000100/manifest.json                     (as any shardserve checkpoint)
    OUT/step_000100/rank-tpXX-ppYY.safetensors         model slices of TP rank XX, stage YY
    OUT/step_000100/optim-tpXX-ppYY.safetensors        AdamW exp_avg / exp_avg_sq / step
    OUT/step_000100/trainer_state.json                 step, config, layout
    OUT/latest                                         name of the newest complete checkpoint

DP replicas hold identical weights and optimizer state, so replica 0 writes. Every rank writes
into a shared temporary directory; after a barrier rank 0 hashes the files, writes the manifest
and renames the directory, then moves `latest` (each step atomic), so a run killed at any
moment leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..checkpoint.atomic import atomic_write_text
from ..checkpoint.io import dtype_name
from ..checkpoint.manifest import FileEntry, Layout, Manifest, TensorEntry, rank_file_name
from ..checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec, sha256_file
from ..partition import tensor_stage
from ..split_table import split_kind


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _optim_name(tp: int, pp: int) -> str:
    return f"optim-tp{tp:02d}-pp{pp:02d}.safetensors"


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = SafetensorsStreamWriter(path, specs)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()


def _model_tensors(tr: Any) -> dict[str, torch.Tensor]:
    """This rank's stored tensors (a tied embedding is stored by the first stage only)."""
    out = {}
    for name, p in tr.model.named_parameters():
        if name == "tok_embeddings.weight" and not tr.model.first:
            continue
        out[name] = p.detach().contiguous()
    return out


def save_checkpoint(tr: Any) -> Path:
    from ..models import expected_tensors

    cfg, step = tr.cfg, tr.step
    out = Path(cfg.out)
    final = out / f"step_{step:06d}"
    tmp = out / f".step_{step:06d}.partial"
    if tr.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if tr.dp_rank == 0:
        _write(tmp / rank_file_name(tr.tp_rank, tr.pp_rank), _model_tensors(tr))
        opt: dict[str, torch.Tensor] = {}
        names = {id(p): n for n, p in tr.model.named_parameters()}
        for p, st in tr.opt.state.items():
            n = names[id(p)]
            opt[f"{n}.exp_avg"] = st["exp_avg"].contiguous()
            opt[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            opt[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        _write(tmp / _optim_name(tr.tp_rank, tr.pp_rank), opt)
    _barrier()
    if tr.rank == 0:
        fam, mcfg = cfg.family, tr.model_cfg
        n_layers = mcfg.n_layers
        tensors = {
            n: TensorEntry(
                shape,
                dtype_name(tr.dtype),
                split_kind(fam, n).value,
                tensor_stage(n, n_layers, cfg.pp),
            )
            for n, shape in expected_tensors(fam, mcfg)
        }
        tdir = tmp / "tokenizer"
        tdir.mkdir()
        tr.data.tokenizer.save(tdir)
        state = {
            "step": step,
            "config": json.loads(json.dumps(cfg.__dict__)),
            "layout": {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp},
        }
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1))
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                tp_rank = pp_rank = None
                if rel.startswith("rank-"):
                    tp_rank, pp_rank = int(rel[7:9]), int(rel[12:14])
                files[rel] = FileEntry(p.stat().st_size, sha256_file(p), tp_rank, pp_rank)
        Manifest(
            family=fam,
            config=mcfg.to_dict(),
            dtype=dtype_name(tr.dtype),
            layout=Layout(cfg.tp, cfg.pp),
            tensors=tensors,
            files=files,
            tokenizer="tokenizer",
            source={"format": "shardserve-train", "step": step, "dp": cfg.dp},
        ).write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(out / "latest", final.name + "\n")
    _barrier()
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    p = Path(out) / "latest"
    if not p.is_file():
        return None
    ck = Path(out) / p.read_text().strip()
    return ck if (ck / "manifest.json").is_file() else None


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load_rank_state(tr: Any, ck: Path) -> int:
    """Load this rank's weights and optimizer state from checkpoint ck; returns its step."""
    from ..checkpoint.io import verify_checkpoint
    from ..checkpoint.manifest import read_manifest

    manifest = read_manifest(ck)
    verify_checkpoint(ck, manifest)
    state = json.loads((ck / "trainer_state.json").read_text())
    lay = state["layout"]
    if (lay["tp"], lay["pp"]) != (tr.cfg.tp, tr.cfg.pp):
        raise ValueError(
            f"{ck}: saved at tp {lay['tp']} pp {lay['pp']}, resuming at tp "
            f"{tr.cfg.tp} pp {tr.cfg.pp}: reshard the weights and start a new run"
        )
    weights = _read(ck / rank_file_name(tr.tp_rank, tr.pp_rank))
    if "tok_embeddings.weight" not in weights and hasattr(tr.model, "tok_embeddings"):
        first = _read(ck / rank_file_name(tr.tp_rank, 0))  # tied copy lives on stage 0
        weights["tok_embeddings.weight"] = first["tok_embeddings.weight"]
    opt = _read(ck / _optim_name(tr.tp_rank, tr.pp_rank))
    params = dict(tr.model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    for n, p in params.items():
        if f"{n}.exp_avg" in opt:
            tr.opt.state[p] = {
                "step": torch.tensor(float(opt[f"{n}.step"][0])),
                "exp_avg": opt[f"{n}.exp_avg"].clone(),
                "exp_avg_sq": opt[f"{n}.exp_avg_sq"].clone(),
            }
    return int(state["step"])
