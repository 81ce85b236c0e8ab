"""manifest.json of a shardserve checkpoint: what the directory holds and how it is cut.

    {
      "format": "shardserve-checkpoint", "format_version": 1,
      "family": "llama", "config": {...}, "dtype": "float32",
      "layout": {"tp": 1, "pp": 1},
      "tokenizer": "tokenizer",                      # sub-directory, or null
      "tensors": {"layers.0.attention.wqkv.weight":
                  {"shape": [...global...], "dtype": "float32", "split": "fused_qkv",
                   "pp_rank": 0}, ...},
      "files": {"rank-tp00-pp00.safetensors": {"size": 123, "sha256": "...",
                                              "tp_rank": 0, "pp_rank": 0}, ...},
      "source": {...provenance...}
    }

Shapes are global (the unsharded tensor); each rank file holds that rank's slice under the
same name. The split kind comes from split_table.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

FORMAT = "shardserve-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Layout:
    """How a checkpoint is cut: tensor-parallel and pipeline-parallel degrees."""

    tp: int = 1
    """Tensor-parallel ranks (one file per tp x pp rank)."""
    pp: int = 1
    """Pipeline stages; stage s holds a contiguous range of layers."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"layout degrees must be >= 1, got tp={self.tp} pp={self.pp}")


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str
    split: str
    pp_rank: int = 0


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    tp_rank: int | None = None
    pp_rank: int | None = None


@dataclass(frozen=True)
class Manifest:
    family: str
    config: dict[str, Any]
    dtype: str
    layout: Layout
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    tokenizer: str | None = "tokenizer"
    source: dict[str, Any] = field(default_factory=dict)

    def rank_files(self) -> dict[tuple[int, int], str]:
        """(tp_rank, pp_rank) -> file name, for the weight files."""
        return {
            (e.tp_rank, e.pp_rank): name
            for name, e in self.files.items()
            if e.tp_rank is not None and e.pp_rank is not None
        }

    def to_json(self) -> str:
        d = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "config": self.config,
            "dtype": self.dtype,
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp},
            "tokenizer": self.tokenizer,
            "tensors": {
                n: {
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "split": t.split,
                    "pp_rank": t.pp_rank,
                }
                for n, t in self.tensors.items()
            },
            "files": {
                n: {"size": f.size, "sha256": f.sha256, "tp_rank": f.tp_rank, "pp_rank": f.pp_rank}
                for n, f in self.files.items()
            },
            "source": self.source,
        }
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    def write(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / MANIFEST, self.to_json())


def rank_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"rank-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and validate directory/manifest.json; errors name the file and the problem."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a shardserve checkpoint?)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {d.get('format')!r}, expected {FORMAT!r}")
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {d.get('format_version')} is not supported "
            f"(this shardserve reads {FORMAT_VERSION})"
        )
    try:
        layout = Layout(**d["layout"])
        tensors = {
            n: TensorEntry(tuple(t["shape"]), t["dtype"], t["split"], t.get("pp_rank", 0))
            for n, t in d["tensors"].items()
        }
        files = {
            n: FileEntry(f["size"], f["sha256"], f.get("tp_rank"), f.get("pp_rank"))
            for n, f in d["files"].items()
        }
        return Manifest(
            family=d["family"],
            config=d["config"],
            dtype=d["dtype"],
            layout=layout,
            tensors=tensors,
            files=files,
            tokenizer=d.get("tokenizer"),
            source=d.get("source", {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
