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


def write_results(name: str, lines: list[str]) -> str:
    """Write loadtest/results/NAME.md whole (temp file, then rename); returns the text."""
    RESULTS.mkdir(exist_ok=True)
    text = "\n".join(lines) + "\n"
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text
