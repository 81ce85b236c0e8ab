"""Generate the Python gRPC stubs of proto/shardserve/v1/*.proto into the client package.

    python proto/generate_stubs.py            # writes clients/shardserve_client/_pb/...
    python proto/generate_stubs.py --out DIR  # elsewhere (the tests compare the two)

The stubs live in shardserve_client (which needs no torch) and the server imports them from
there. protoc writes absolute imports (`from shardserve.v1 import generate_pb2`); they are
rewritten to relative ones so the stubs import as shardserve_client._pb.shardserve.v1.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "clients" / "shardserve_client" / "_pb"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("shardserve/v1/*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for d in (out, out / "shardserve", out / "shardserve" / "v1"):
        init = d / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (see proto/generate_stubs.py)."""\n')
    for f in sorted((out / "shardserve" / "v1").glob("*_pb2*.py*")):
        text = f.read_text()
        text = re.sub(r"^from shardserve\.v1 import ", "from . import ", text, flags=re.M)
        f.write_text(text)
        written.append(f)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    for f in generate(args.out):
        print(f.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
