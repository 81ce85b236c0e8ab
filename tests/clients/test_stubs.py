"""The committed gRPC stubs match proto/ and the client never imports torch or the server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PB = REPO / "clients" / "shardserve_client" / "_pb"


def test_stubs_match_proto(tmp_path):
    subprocess.run([sys.executable, str(REPO / "proto" / "generate_stubs.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    committed = sorted(p.relative_to(PB) for p in PB.rglob("*.py*") if "__pycache__" not in
                       p.parts)
    assert fresh == committed
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (PB / rel).read_bytes(), (
            f"{rel} is stale: run python proto/generate_stubs.py")


def test_client_imports_nothing_heavy():
    banned = {"torch", "shardserve_server", "shardserve_sharding", "numpy"}
    for f in (REPO / "clients" / "shardserve_client").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in banned, f"{f} imports {n}"
