"""server/deploy: every manifest validates with kubernetes-validate (its bundled, offline
schemas) against the pinned Kubernetes versions, strict (unknown fields refused); the
ServiceMonitor, a custom resource kubernetes-validate has no schema for, validates against our
own schema of it (server/deploy/schemas/). And what a schema cannot see: every container's
arguments parse with shardserve's own CLI, probes use our health services, the grace period
covers preStop + --drain-timeout, the HPA's metric is one the server exports, the worker
StatefulSet runs the ranks the leader leaves, the Dockerfile copies what exists."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shardserve_server.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "server" / "deploy"
# the oldest version the manifests need (the pod-index label, gRPC probes) and a current one
K8S_VERSIONS = ("1.28.0", "1.34.0")
READINESS = "shardserve.v1.TextGeneration"


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


DOCS = _docs()


def _kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _containers() -> list[tuple[dict, dict]]:
    return [(w, c) for w in _kind("Deployment") + _kind("StatefulSet")
            for c in w["spec"]["template"]["spec"]["containers"]]


def test_the_manifests_are_there():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    assert any(s["spec"].get("clusterIP") == "None" for s in _kind("Service"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name, doc", DOCS, ids=[f"{n}:{d['kind']}" for n, d in DOCS])
def test_manifest_validates(name, doc, version):
    if doc["apiVersion"] == "monitoring.coreos.com/v1":  # a CRD: our schema of it
        schema = json.loads((DEPLOY / "schemas" / "servicemonitor.schema.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    # raises ValidationError, or SchemaNotFoundError for a kind it does not know (which the
    # command-line tool only warns about: here it fails)
    kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_caught():
    doc = json.loads(json.dumps(_kind("Deployment")[0]))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc = json.loads(json.dumps(_kind("Deployment")[0]))
    doc["spec"]["template"]["spec"]["containers"][0]["resources"]["request"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def _argv(c: dict) -> list[str]:
    """The shardserve argv of a container (a `sh -c "exec shardserve ..."` one unwrapped),
    with Kubernetes' $(VAR) and the shell's $((...)) filled with sample values."""
    words = [*c.get("command", []), *c.get("args", [])]
    if words[:2] == ["/bin/sh", "-c"]:
        script = re.sub(r"\$\(\((.*?)\)\)", "1", " ".join(words[2:]))
        words = shlex.split(script)
        assert words[:2] == ["exec", "shardserve"], script
        words = words[2:]
    return [re.sub(r"\$\((\w+)\)", "10.0.0.1", w) for w in words]


def test_container_arguments_parse_with_our_cli():
    for _, c in _containers():
        args = build_parser().parse_args(_argv(c))
        assert args.command in ("serve", "worker")


def test_probes_grace_and_drain_agree():
    for w, c in _containers():
        args = build_parser().parse_args(_argv(c))
        if args.command != "serve":
            continue
        assert c["readinessProbe"]["grpc"]["service"] == READINESS
        assert c["livenessProbe"]["grpc"]["service"] == ""
        ports = {p["containerPort"] for p in c["ports"]}
        assert {args.port, args.metrics_port, args.http_port} <= ports
        assert args.host == "0.0.0.0"
        pre = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre[0] == "sleep"
        grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= float(pre[1]) + args.drain_timeout + 5, w["metadata"]["name"]


def test_the_group_adds_up():
    leader = next(s for s in _kind("StatefulSet") if "leader" in s["metadata"]["name"])
    worker = next(s for s in _kind("StatefulSet") if "worker" in s["metadata"]["name"])
    serve = build_parser().parse_args(_argv(leader["spec"]["template"]["spec"]
                                            ["containers"][0]))
    join = build_parser().parse_args(_argv(worker["spec"]["template"]["spec"]["containers"][0]))
    assert worker["spec"]["replicas"] == serve.tp - serve.local_ranks
    assert serve.rendezvous.endswith(":29400") and join.join.endswith(":29400")
    headless = next(s for s in _kind("Service") if s["metadata"]["name"] ==
                    leader["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert join.join.startswith(f"{leader['metadata']['name']}-0.{headless['metadata']['name']}:")
    for s in (leader, worker):
        env = {e["name"]: e for e in s["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["GLOO_SOCKET_IFNAME"]["value"] == "eth0"


def test_hpa_metric_is_exported_and_monitor_finds_metrics_ports():
    from shardserve_server.api.metrics import Metrics

    names = {m.name for m in Metrics().registry.collect()}
    for hpa in _kind("HorizontalPodAutoscaler"):
        for m in hpa["spec"]["metrics"]:
            assert m["pods"]["metric"]["name"] in names
    for mon in _kind("ServiceMonitor"):
        want = mon["spec"]["selector"]["matchLabels"]
        picked = [s for s in _kind("Service")
                  if want.items() <= s["metadata"].get("labels", {}).items()]
        assert picked
        for s in picked:  # every picked Service scrapes a real metrics port
            ports = {p["name"] for p in s["spec"]["ports"]}
            assert {e["port"] for e in mon["spec"]["endpoints"]} <= ports, s["metadata"]["name"]


def test_dockerfile_copies_what_exists_and_pins_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    root = DEPLOY.parents[1]
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (root / src).exists(), src
    pinned = re.search(r"^torch==(\S+)$", (root / "constraints.txt").read_text(), re.M)
    assert f'"torch=={pinned.group(1)}"' in text
