"""Check a checkpoint's files against its manifest: presence, size, and sha256 by default.

Hashing SmolLM2's 538 MB takes a fraction of a second to a few seconds (figures in
loadtest/results/verify.md), so a file whose hash was checked is remembered in a stamp file by
(name, sha256 in the manifest, size, mtime_ns, inode): a restart that finds the same file
untouched does not hash it again. The stamp is `.shardserve-verified.json` in the checkpoint
directory, or, where that directory is read-only, a file named after its absolute path under
$XDG_CACHE_HOME/shardserve/verified (~/.cache when unset). A stamp that is missing, damaged or
from another manifest only costs a re-hash; it is written whole (temp file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .manifest import CheckpointError, Manifest
from .safetensors_stream import sha256_file

STAMP = ".shardserve-verified.json"


@dataclass(frozen=True)
class VerifyReport:
    """What one verification did."""

    files: int
    """Files checked (presence and size)."""
    hashed_bytes: int
    """Bytes hashed now (0 when every file was in the stamp)."""
    remembered: int
    """Files whose hash the stamp vouched for."""


def _key(name: str, digest: str, st: os.stat_result) -> str:
    return f"{name}|{digest}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _stamp_paths(root: Path) -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return [root / STAMP, cache / "shardserve" / "verified" / f"{tag}.json"]


def _read_stamp(root: Path) -> set[str]:
    for path in _stamp_paths(root):
        try:
            keys = json.loads(path.read_text(encoding="utf-8")).get("verified", [])
            return {k for k in keys if isinstance(k, str)}
        except (OSError, ValueError, AttributeError):
            continue
    return set()


def _write_stamp(root: Path, keys: set[str]) -> None:
    text = json.dumps({"verified": sorted(keys)}, indent=0) + "\n"
    for path in _stamp_paths(root):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            return
        except OSError:
            continue


def verify_checkpoint(directory: str | os.PathLike[str], manifest: Manifest, *,
                      hashes: bool = True) -> VerifyReport:
    """Every file listed exists inside the directory with its recorded size and, when
    `hashes`, its recorded sha256 (unless the stamp remembers it); CheckpointError names the
    first file that fails."""
    root = Path(directory)
    real_root = root.resolve()
    known = _read_stamp(root) if hashes else set()
    good: set[str] = set()
    hashed = remembered = 0
    for name, entry in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in manifest.json)")
        if not path.resolve().is_relative_to(real_root):
            raise CheckpointError(f"{path}: resolves outside the checkpoint directory (refused)")
        st = path.stat()
        if st.st_size != entry.size:
            raise CheckpointError(
                f"{path}: size {st.st_size} bytes, manifest says {entry.size} (truncated or "
                "altered)"
            )
        if not hashes:
            continue
        key = _key(name, entry.sha256, st)
        if key in known:
            remembered += 1
        else:
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from e
            if digest != entry.sha256:
                raise CheckpointError(f"{path}: sha256 does not match manifest.json (corrupt)")
            hashed += st.st_size
        good.add(key)
    if hashes and good != known:
        _write_stamp(root, good)
    return VerifyReport(len(manifest.files), hashed, remembered)
