"""Loading pickles that other frameworks write, without running code from them.

torch.load(weights_only=True) refuses any global outside torch's tensor allow-list plus the
classes we name. A file that needs anything else is refused with CheckpointError naming the
file and the global. DCP's `.metadata` is a plain pickle of dataclasses; RestrictedUnpickler
resolves only the handful of classes DCP writes.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.manifest import CheckpointError

# Globals a Megatron checkpoint's `args` Namespace may hold that are plain data.
# io.BytesIO: Transformer-Engine `_extra_state` entries (fp8 metadata) in older checkpoints.
MEGATRON_SAFE_GLOBALS: list[Any] = [argparse.Namespace, io.BytesIO]


def torch_load_safe(
    path: str | Path, extra_globals: list[Any] | None = None, mmap: bool = True
) -> Any:
    """torch.load with weights_only=True and an explicit allow-list; clear refusal otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    allowed = list(MEGATRON_SAFE_GLOBALS) + list(extra_globals or [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: it references code outside the allow-list "
            f"({str(e).splitlines()[0][:300]})"
        ) from e
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) files cannot be mapped
            return torch_load_safe(path, extra_globals, mmap=False)
        raise CheckpointError(f"{path}: unreadable torch file ({e})") from e
    except (EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable torch file ({type(e).__name__}: {e})") from e


_DCP_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for DCP metadata: only the DCP dataclasses, torch dtypes/Size and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_ALLOWED:
            if module == "pathlib":
                return getattr(pathlib, name)
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in ("strided", "contiguous_format", "preserve_format"):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_dcp_metadata(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a DCP checkpoint directory?)")
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle ({e})") from e
    except Exception as e:  # truncated or corrupt pickles raise many kinds of errors
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from e
