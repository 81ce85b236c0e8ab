"""Where a client connects, and how its calls spread over several servers.

All of it is gRPC's own machinery, configured here:

- `"host:port"`: one server (gRPC's default pick_first policy).
- several servers, as a list or `"10.0.0.1:50051,10.0.0.2:50051"`: gRPC's static `ipv4:` /
  `ipv6:` address-list resolver (IP literals only: for names use a DNS name, below).
- `"dns:///name:port"`: gRPC's DNS resolver; every address the name resolves to is a server
  (a Kubernetes headless Service gives one per ready pod) and gRPC re-resolves when
  connections fail.

A balanced target (several servers, or any `dns:` name) gets a service config with the
`round_robin` policy and client-side health checking (`healthCheckConfig`) on the servers'
readiness service: a server whose readiness is NOT_SERVING (its worker group restarting, or it
drains) gets no new calls until it is ready again. Calls refused with UNAVAILABLE before any
response (a server that began draining between health updates) are retried by gRPC's retry
policy on another server, at most `max_attempts` times in all.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

READINESS = "shardserve.v1.TextGeneration"


def _is_ip(host: str) -> int:
    """4 or 6 for an IP literal (IPv6 in brackets), 0 for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return 0


def resolve_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """(the gRPC target string, whether calls are balanced); ValueError explains a bad one."""
    parts = [target] if isinstance(target, str) else list(target)
    parts = [t.strip() for p in parts for t in p.split(",") if t.strip()]
    if not parts:
        raise ValueError("no target given")
    if len(parts) == 1:
        t = parts[0]
        return t, t.startswith("dns:") or (t.startswith(("ipv4:", "ipv6:")) and "," in t)
    versions = set()
    for t in parts:
        host, sep, port = t.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {t!r} is not HOST:PORT")
        version = _is_ip(host)
        if not version:
            raise ValueError(
                f"several targets must be IP addresses ({t!r} is a name): for names use "
                "one DNS name with an address per server, 'dns:///NAME:PORT'")
        versions.add(version)
    if len(versions) > 1:
        raise ValueError("several targets must all be IPv4 or all IPv6")
    return f"ipv{versions.pop()}:{','.join(parts)}", True


def service_config(max_attempts: int = 3) -> str:
    """round_robin + health checking on the readiness service + retry of UNAVAILABLE."""
    cfg: dict = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": READINESS},
    }
    if max_attempts > 1:
        cfg["methodConfig"] = [{
            "name": [{"service": READINESS}],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.1s",
                            "maxBackoff": "1s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return json.dumps(cfg)


def channel_args(target: str | Sequence[str], options: list | None = None,
                 max_attempts: int = 3) -> tuple[str, list]:
    """The target string and channel options for grpc.*_channel."""
    resolved, balanced = resolve_target(target)
    opts = list(options or [])
    if balanced and not any(k == "grpc.service_config" for k, _ in opts):
        opts.append(("grpc.service_config", service_config(max_attempts)))
    return resolved, opts
