"""`shardserve-client`: call a shardserve server from the shell.

    shardserve-client [--target 127.0.0.1:50051] [--token-file F] [--tls CA.pem] \
        generate "Once upon a time" [--max-new-tokens 32 --temperature 0 --seed 1 --stream --json]
    shardserve-client chat "What is 2+2?"      shardserve-client tokenize "hello"
    shardserve-client info                      shardserve-client health [--ready]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .client import Client
from .targets import READINESS
from .types import ShardserveError


def _params(a: argparse.Namespace) -> dict:
    p = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k,
         "top_p": a.top_p, "seed": a.seed}
    if a.stop:
        p["stop_sequences"] = a.stop
    return {k: v for k, v in p.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shardserve-client", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051",
                    help="HOST:PORT, several IP:PORT comma-separated, or dns:///NAME:PORT "
                    "(several servers: round-robin over the ready ones)")
    ap.add_argument("--token-file", help="file with the bearer token")
    ap.add_argument("--tls", help="CA certificate (PEM) to trust; enables TLS")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("generate", "chat"):
        p = sub.add_parser(name)
        p.add_argument("text")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append")
        p.add_argument("--stream", action="store_true")
        p.add_argument("--json", action="store_true")
    sub.add_parser("tokenize").add_argument("text")
    sub.add_parser("info")
    sub.add_parser("health").add_argument("--ready", action="store_true",
                                          help="readiness instead of liveness")
    a = ap.parse_args(argv)
    token = Path(a.token_file).read_text().strip() if a.token_file else None
    try:
        with Client(a.target, token=token, tls=a.tls or False, timeout=a.timeout) as c:
            if a.cmd in ("generate", "chat"):
                arg = a.text if a.cmd == "generate" else [{"role": "user", "content": a.text}]
                if a.stream:
                    fn = c.generate_stream if a.cmd == "generate" else c.chat_stream
                    for chunk in fn(arg, **_params(a)):
                        print(chunk.text, end="", flush=True)
                    print()
                else:
                    fn = c.generate if a.cmd == "generate" else c.chat
                    r = fn(arg, **_params(a))
                    if a.json:
                        d = dataclasses.asdict(r)
                        d["finish_reason"] = r.finish_reason.value
                        print(json.dumps(d, ensure_ascii=False))
                    else:
                        print(r.text)
            elif a.cmd == "tokenize":
                print(json.dumps(c.tokenize(a.text)))
            elif a.cmd == "info":
                print(json.dumps(dataclasses.asdict(c.model_info()), indent=1))
            else:
                ok = c.health(READINESS if a.ready else "")
                print("SERVING" if ok else "NOT_SERVING")
                return 0 if ok else 1
    except ShardserveError as e:
        print(f"shardserve-client: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
