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
      "source": {...provenance...},
      "quantization": {"scheme": "int4", "group_size": 32,     # absent: float weights
                       "embedding": "int8", "origin": "float"}
    }

In a quantized checkpoint (quant/scheme.py) a quantized weight's entry has dtype int8 or uint8
and its scales have entries of their own (NAME_scale / NAME_qparams, float32); "dtype" is the
float dtype of everything else. The sha256 of every file covers them all.

Shapes are global (the unsharded tensor); each rank file holds that rank's slice under the
same name. The split kind comes from split_table.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import atomic_write_text

FORMAT = "shardserve-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Float dtypes a checkpoint may hold (torch names)."""
QUANT_DTYPE_NAMES = ("int8", "uint8")
"""Integer dtypes of a quantized checkpoint's weights (entries only, never "dtype")."""


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
    quantization: dict[str, Any] | None = None
    """quant.scheme.QuantConfig.to_dict() of a quantized checkpoint, None for float weights."""

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
        if self.quantization is not None:
            d["quantization"] = self.quantization
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    def write(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / MANIFEST, self.to_json())


def rank_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"rank-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and validate directory/manifest.json; errors name the file and the problem.

    Every field is type-checked here, so a damaged manifest fails with one CheckpointError
    before anything is read or written: unknown dtypes, split kinds or file names that
    would leave the checkpoint directory (absolute, `..`) are refused."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a shardserve checkpoint?)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: malformed manifest (a JSON object is expected, "
                              f"got {type(d).__name__})")
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {d.get('format')!r}, expected {FORMAT!r}")
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {d.get('format_version')!r} is not supported "
            f"(this shardserve reads {FORMAT_VERSION})"
        )
    try:
        return _parse(d)
    except _Bad as e:
        raise CheckpointError(f"{path}: malformed manifest ({e})") from None


class _Bad(Exception):
    """A manifest field with the wrong type or value (the message names it)."""


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise _Bad(f"{where}{key} is missing")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Bad(f"{where}{key} has type {type(value).__name__}")
    return value


def _int(value: Any, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Bad(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _dtype(value: Any, what: str, names: tuple[str, ...] = DTYPE_NAMES) -> str:
    if value not in names:
        raise _Bad(f"{what} {value!r} is not one of {list(names)}")
    return value


def safe_relative(name: Any, what: str) -> str:
    """`name` if it is a plain relative path inside the checkpoint, else _Bad."""
    if not isinstance(name, str) or not name:
        raise _Bad(f"{what} must be a non-empty string, got {name!r}")
    parts = PurePosixPath(name).parts
    if (name.startswith(("/", "\\")) or "\\" in name or "\0" in name or ".." in parts
            or ":" in parts[0]):
        raise _Bad(f"{what} {name!r} leaves the checkpoint directory")
    return name


def _parse(d: dict[str, Any]) -> Manifest:
    from ..split_table import SplitKind

    splits = {k.value for k in SplitKind}
    quant = d.get("quantization")
    if quant is not None:
        from ..quant.scheme import QuantConfig

        try:
            quant = QuantConfig.from_dict(quant).to_dict()
        except ValueError as e:
            raise _Bad(f"quantization: {e}") from None
    names = DTYPE_NAMES + (QUANT_DTYPE_NAMES if quant is not None else ())
    lay = _get(d, "layout", dict, "")
    layout = Layout(_int(lay.get("tp"), "layout.tp", 1), _int(lay.get("pp"), "layout.pp", 1))
    tensors = {}
    for n, t in _get(d, "tensors", dict, "").items():
        where = f"tensors[{n!r}]."
        if not isinstance(t, dict):
            raise _Bad(f"tensors[{n!r}] is not an object")
        shape = tuple(_int(x, f"{where}shape[]") for x in _get(t, "shape", list, where))
        split = _get(t, "split", str, where)
        if split not in splits:
            raise _Bad(f"{where}split {split!r} is not one of {sorted(splits)}")
        tensors[n] = TensorEntry(shape, _dtype(t.get("dtype"), f"{where}dtype", names), split,
                                 _int(t.get("pp_rank", 0), f"{where}pp_rank"))
    files = {}
    for n, f in _get(d, "files", dict, "").items():
        where = f"files[{n!r}]."
        safe_relative(n, "file name")
        if not isinstance(f, dict):
            raise _Bad(f"files[{n!r}] is not an object")
        digest = _get(f, "sha256", str, where)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _Bad(f"{where}sha256 is not a hex sha256 digest")
        ranks = [None if f.get(k) is None else _int(f.get(k), where + k)
                 for k in ("tp_rank", "pp_rank")]
        files[n] = FileEntry(_int(f.get("size"), f"{where}size"), digest, *ranks)
    tokenizer = d.get("tokenizer")
    if tokenizer is not None:
        safe_relative(tokenizer, "tokenizer")
    source = d.get("source", {})
    return Manifest(
        family=_get(d, "family", str, ""),
        config=_get(d, "config", dict, ""),
        dtype=_dtype(d.get("dtype"), "dtype"),
        layout=layout,
        tensors=tensors,
        files=files,
        tokenizer=tokenizer,
        source=source if isinstance(source, dict) else {},
        quantization=quant,
    )
