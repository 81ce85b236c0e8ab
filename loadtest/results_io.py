"""Shared by the benchmark scripts: the results header and the atomic write of a results file."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def header(title: str, command: str) -> list[str]:
    """Markdown lines: title, the exact command, date and machine."""
    return [f"# {title}", "", f"Command: `{command}`  ",
            f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: "
            f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}", ""]


def cpu_flags() -> str:
    """The CPU features that decide kernel paths here (bf16, AMX, AVX-512, AVX2)."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    keep = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "sha_ni"}
    return " ".join(sorted(flags & keep)) or "none of " + " ".join(sorted(keep))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write path whole: a temp file beside it, then rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def write_results(name: str, lines: list[str]) -> str:
    """Write loadtest/results/NAME.md whole (temp file, then rename); returns the text."""
    RESULTS.mkdir(exist_ok=True)
    text = "\n".join(lines) + "\n"
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text
