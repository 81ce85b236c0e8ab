"""Target strings: one server, several IP:PORT (gRPC's ipv4:/ipv6: lists), dns:/// names; the
service config that balances them (round_robin, health checking on readiness, retries)."""

from __future__ import annotations

import json

import pytest

from shardserve_client.targets import READINESS, channel_args, resolve_target


def test_one_server_is_not_balanced():
    assert resolve_target("localhost:50051") == ("localhost:50051", False)
    assert channel_args("localhost:50051") == ("localhost:50051", [])


def test_several_ips_become_a_grpc_address_list():
    assert resolve_target(["10.0.0.1:1", "10.0.0.2:2"]) == ("ipv4:10.0.0.1:1,10.0.0.2:2", True)
    assert resolve_target("10.0.0.1:1, 10.0.0.2:2") == ("ipv4:10.0.0.1:1,10.0.0.2:2", True)
    assert resolve_target("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", True)


def test_dns_names_are_balanced():
    assert resolve_target("dns:///shardserve.default.svc:50051") == (
        "dns:///shardserve.default.svc:50051", True)


@pytest.mark.parametrize("bad, why", [
    (["a.example:1", "10.0.0.1:2"], "dns:///"),
    (["10.0.0.1:1", "[::1]:2"], "IPv4 or all IPv6"),
    (["10.0.0.1", "10.0.0.2:2"], "HOST:PORT"),
    ([], "no target"),
])
def test_bad_target_lists_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        resolve_target(bad)


def test_balanced_service_config():
    target, opts = channel_args(["10.0.0.1:1", "10.0.0.2:2"], [("grpc.x", 1)], max_attempts=4)
    cfg = json.loads(dict(opts)["grpc.service_config"])
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["healthCheckConfig"] == {"serviceName": READINESS}
    retry = cfg["methodConfig"][0]["retryPolicy"]
    assert retry["maxAttempts"] == 4 and retry["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert ("grpc.x", 1) in opts
    _, no_retry = channel_args("dns:///x:1", max_attempts=1)
    assert "methodConfig" not in json.loads(dict(no_retry)["grpc.service_config"])
