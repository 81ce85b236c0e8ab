"""The client installs and imports in a fresh venv with no torch; the packages import from
outside the repository and no generic `server` or `clients` module exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_client_venv_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                    str(REPO / "constraints.txt"), str(REPO / "clients")], check=True,
                   timeout=600)
    code = (
        "import importlib.util, shardserve_client\n"
        "from shardserve_client import Client, AsyncClient\n"
        "for m in ('torch', 'shardserve_server', 'shardserve_sharding', 'server', 'clients'):\n"
        "    assert importlib.util.find_spec(m) is None, m\n"
        "print('ok')\n"
    )
    out = subprocess.run([py, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "ok"
    assert (venv / "bin" / "shardserve-client").exists()


def test_packages_import_from_outside_repo(tmp_path):
    code = (
        "import importlib.util\n"
        "import shardserve_sharding, shardserve_server, shardserve_client\n"
        "assert importlib.util.find_spec('server') is None\n"
        "assert importlib.util.find_spec('clients') is None\n"
        "assert importlib.util.find_spec('sharding') is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok"
