"""Write and read shardserve checkpoints.

Writing goes through CheckpointBuilder: an atomic temporary directory, one streaming
safetensors writer per rank file, sha256 and size recorded per file, manifest written last,
then the rename. Reading checks every file's presence, size and sha256 (verify.py) before
any tensor is touched, so a damaged checkpoint fails early with the file's name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..split_table import split_kind
from .atomic import atomic_directory
from .manifest import (
    DTYPE_NAMES,
    QUANT_DTYPE_NAMES,
    CheckpointError,
    FileEntry,
    Layout,
    Manifest,
    TensorEntry,
    rank_file_name,
    read_manifest,
)
from .safetensors_stream import SafetensorsStreamWriter, TensorSpec, sha256_file
from .verify import verify_checkpoint

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
TENSOR_DTYPES: dict[str, torch.dtype] = {
    **DTYPES, **{name: getattr(torch, name) for name in QUANT_DTYPE_NAMES}}
"""Every dtype a tensor entry may name (quantized weights are int8 / uint8)."""


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in TENSOR_DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported checkpoint dtype {dtype}")


class CheckpointBuilder:
    """Build a checkpoint directory atomically; use as a context manager.

    with CheckpointBuilder(dst, family=..., config=..., layout=..., dtype=...) as b:
        w = b.open_rank_file(tp_rank, pp_rank, specs)   # SafetensorsStreamWriter
        ... w.write(name, tensor) for each spec ...
        b.close_rank_file(w, tp_rank, pp_rank)
        b.add_tensor_entry(name, global_shape, pp_rank)
        b.save_tokenizer(bundle)
    """

    def __init__(
        self,
        dst: str | os.PathLike[str],
        *,
        family: str,
        config: Mapping[str, Any],
        layout: Layout,
        dtype: torch.dtype,
        source: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        quantization: Mapping[str, Any] | None = None,
    ) -> None:
        self.dst = Path(dst)
        self.quantization = dict(quantization) if quantization is not None else None
        self.family, self.config, self.layout, self.dtype = family, dict(config), layout, dtype
        self.source = dict(source or {})
        self.overwrite = overwrite
        self.tensors: dict[str, TensorEntry] = {}
        self.files: dict[str, FileEntry] = {}
        self.tokenizer_dir: str | None = None
        self._stack = ExitStack()
        self._open: list[SafetensorsStreamWriter] = []

    def __enter__(self) -> CheckpointBuilder:
        self.root = self._stack.enter_context(atomic_directory(self.dst, overwrite=self.overwrite))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            for w in self._open:
                w.abort()
            self._stack.__exit__(*__import__("sys").exc_info())
            raise
        if exc_type is not None:
            for w in self._open:
                w.abort()
        return self._stack.__exit__(exc_type, exc, tb)

    def open_rank_file(
        self, tp_rank: int, pp_rank: int, specs: list[TensorSpec]
    ) -> SafetensorsStreamWriter:
        name = rank_file_name(tp_rank, pp_rank)
        w = SafetensorsStreamWriter(
            self.root / name,
            specs,
            metadata={"format": "pt", "tp_rank": str(tp_rank), "pp_rank": str(pp_rank)},
        )
        self._open.append(w)
        return w

    def close_rank_file(self, w: SafetensorsStreamWriter, tp_rank: int, pp_rank: int) -> None:
        digest = w.close()
        self._open.remove(w)
        self.files[w.path.name] = FileEntry(w.size, digest, tp_rank, pp_rank)

    def add_tensor_entry(self, name: str, shape: tuple[int, ...], pp_rank: int = 0,
                         dtype: torch.dtype | None = None) -> None:
        """Record a stored tensor (dtype: its own, for quantized weights and their scales)."""
        self.tensors[name] = TensorEntry(
            tuple(shape), dtype_name(dtype or self.dtype), split_kind(self.family, name).value,
            pp_rank
        )

    def save_tokenizer(self, bundle: Any) -> None:
        """Store a TokenizerBundle under tokenizer/ (its files are hashed like the weights)."""
        tdir = self.root / "tokenizer"
        tdir.mkdir(exist_ok=True)
        bundle.save(tdir)
        self.tokenizer_dir = "tokenizer"

    def copy_tokenizer(self, src_dir: str | os.PathLike[str]) -> None:
        """Store another checkpoint's tokenizer/ files as they are (no parse, no re-save)."""
        tdir = self.root / "tokenizer"
        tdir.mkdir(exist_ok=True)
        for p in sorted(Path(src_dir).iterdir()):
            if p.is_symlink() or not p.is_file():
                raise CheckpointError(f"{p}: not a regular tokenizer file")
            shutil.copyfile(p, tdir / p.name)
        self.tokenizer_dir = "tokenizer"

    def _finish(self) -> None:
        if self._open:
            raise CheckpointError(
                f"{self.dst}: rank files left open: {[w.path.name for w in self._open]}"
            )
        if self.tokenizer_dir:
            for p in sorted((self.root / self.tokenizer_dir).iterdir()):
                rel = f"{self.tokenizer_dir}/{p.name}"
                self.files[rel] = FileEntry(p.stat().st_size, sha256_file(p))
        Manifest(
            family=self.family,
            config=self.config,
            dtype=dtype_name(self.dtype),
            layout=self.layout,
            tensors=self.tensors,
            files=self.files,
            tokenizer=self.tokenizer_dir,
            source=self.source,
            quantization=self.quantization,
        ).write(self.root)


def write_checkpoint(
    dst: str | os.PathLike[str],
    *,
    family: str,
    config: Mapping[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: list[TensorSpec],
    tokenizer: Any | None = None,
    source: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a TP=1, PP=1 checkpoint, streaming `tensors` (in `specs` order) to one file."""
    with CheckpointBuilder(
        dst,
        family=family,
        config=config,
        layout=Layout(1, 1),
        dtype=dtype,
        source=source,
        overwrite=overwrite,
    ) as b:
        w = b.open_rank_file(0, 0, specs)
        for name, t in tensors:
            w.write(name, t.to(dtype))
            b.add_tensor_entry(name, tuple(t.shape))
        b.close_rank_file(w, 0, 0)
        if tokenizer is not None:
            b.save_tokenizer(tokenizer)
    return Path(dst)


def read_rank_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors rank file (no pickle involved)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def load_full_state_dict(
    directory: str | os.PathLike[str],
    manifest: Manifest | None = None,
    *,
    verify_hashes: bool = True,
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Read a TP=1 checkpoint (any PP) into one state dict, checking names and shapes."""
    root = Path(directory)
    manifest = manifest or read_manifest(root)
    verify_checkpoint(root, manifest, hashes=verify_hashes)
    if manifest.layout.tp != 1:
        raise CheckpointError(
            f"{root}: layout tp={manifest.layout.tp}; merge it with `shardserve reshard --tp 1`"
            " or load it through the sharded loader"
        )
    state: dict[str, torch.Tensor] = {}
    for _, fname in sorted(manifest.rank_files().items()):
        for name, t in read_rank_file(root / fname).items():
            entry = manifest.tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{root / fname}: tensor {name} not in manifest.json")
            if tuple(t.shape) != entry.shape:
                raise CheckpointError(
                    f"{root / fname}: {name} has shape {list(t.shape)}, "
                    f"manifest says {list(entry.shape)}"
                )
            state[name] = t
    missing = sorted(set(manifest.tensors) - set(state))
    if missing:
        raise CheckpointError(f"{root}: tensors missing from rank files: {missing[:5]}")
    return manifest, state


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    manifest: Manifest


def load_tokenizer(directory: str | os.PathLike[str], manifest: Manifest) -> Any:
    from ..tokenizer import TokenizerBundle

    if manifest.tokenizer is None:
        return None
    return TokenizerBundle.load(Path(directory) / manifest.tokenizer)


def load_model(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    verify_hashes: bool = True,
    device: str = "cpu",
) -> LoadedModel:
    """Build the model described by the manifest and load its weights (TP=1 checkpoints)."""
    from ..materialize import materialize
    from ..models import config_from_dict, expected_tensors

    root = Path(directory)
    if read_manifest(root).quantization is not None:  # quantized modules: the TP loader's job
        from ..sharded_load import load_sharded_model
        from ..tp.comm import ThreadGroup

        model = load_sharded_model(root, ThreadGroup(1).comm(0), dtype=dtype,
                                   verify_hashes=verify_hashes)
        manifest = read_manifest(root)
        return LoadedModel(model, load_tokenizer(root, manifest), manifest)
    manifest, state = load_full_state_dict(root, verify_hashes=verify_hashes)
    try:
        config = config_from_dict(manifest.family, manifest.config)
        shapes = dict(expected_tensors(manifest.family, config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{root / 'manifest.json'}: invalid model config ({e})") from e
    wrong = [f"{n} {list(t.shape)} vs config {list(shapes[n])}" for n, t in state.items()
             if n in shapes and tuple(t.shape) != tuple(shapes[n])]
    if wrong:
        raise CheckpointError(f"{root / 'manifest.json'}: config does not fit the weights: "
                              f"{wrong[:3]}")
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise CheckpointError(
            f"{root / 'manifest.json'}: weights do not match the {manifest.family} config "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    model = materialize(manifest.family, config, state, dtype=dtype, device=device)
    return LoadedModel(model, load_tokenizer(root, manifest), manifest)
