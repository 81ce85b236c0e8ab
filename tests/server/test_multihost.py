"""A TP=3 group whose ranks run in three network namespaces (three "hosts" on one bridge):
rendezvous through the front end's TCPStore, gloo between the namespaces' own addresses,
greedy parity with TP=1, UNAVAILABLE within the collective timeout when one host's link goes
down mid-stream, and the same group serving again once the link is back.

Topology (created here, deleted in the fixture's teardown even on failure): namespaces A, B, C
with one veth each into a bridge in a fourth namespace (the switch); 10.213.7.1-3/24 exist only
inside them. A runs `shardserve serve --tp 3 --local-ranks 1 --rendezvous 10.213.7.1:PORT`
(rank 0, the leader) with gRPC on a Unix socket (the test process stays in the root namespace);
B and C run `shardserve worker --join` for ranks 1 and 2. Each rank reads its own rank file of
a TP=3 checkpoint. Skips with the reason where namespaces cannot be created (not root, no
`ip`, no veth/bridge support).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_servers import BIN, RunningServer, poll

from shardserve_client import READINESS, Client
from shardserve_client.types import ShardserveError

pytestmark = pytest.mark.slow

PG_TIMEOUT_S = 3.0
RDV_PORT = 29513
NET = "10.213.7"
PROMPTS = ["the quick brown fox", "hello there, general", "def add(a, b):"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


def _cannot_netns() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ssprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace with a bridge and veths: {e.stderr or e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Three namespaces on one bridge; `run` starts a process inside one."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.switch = f"sssw{tag}"
        self.ns = {h: f"ss{h.lower()}{tag}" for h in "ABC"}
        self.ifname = {h: f"ss{h.lower()}0" for h in "ABC"}
        self.addr = {h: f"{NET}.{i + 1}" for i, h in enumerate("ABC")}
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for h, ns in self.ns.items():
            _ip("netns", "add", ns)
            port = f"p{h.lower()}"
            _ip("link", "add", self.ifname[h], "netns", ns, "type", "veth",
                "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", self.ifname[h])
            _ip("-n", ns, "link", "set", self.ifname[h], "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def prefix(self, h: str) -> tuple[str, ...]:
        # gloo binds and advertises this interface's address (torch.distributed's knob)
        return ("ip", "netns", "exec", self.ns[h], "env", f"GLOO_SOCKET_IFNAME={self.ifname[h]}")

    def run(self, h: str, *cmd: str, log: Path) -> subprocess.Popen:
        out = open(log, "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([*self.prefix(h), *cmd], stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def link(self, h: str, state: str) -> None:
        _ip("-n", self.ns[h], "link", "set", self.ifname[h], state)

    def down(self) -> None:
        for p in self.procs:  # our process groups (each joined worker and its ranks)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for ns in [*self.ns.values(), self.switch]:
            # anything still inside a namespace we made is ours (ranks of a killed worker)
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)


def _tp3_model(root: Path) -> tuple[Path, Path]:
    """A tiny Llama whose heads split three ways, at TP=1 and resharded to TP=3."""
    import torch
    from conftest import TINY_CORPUS

    from shardserve_sharding.checkpoint.io import write_checkpoint
    from shardserve_sharding.checkpoint.safetensors_stream import TensorSpec
    from shardserve_sharding.models import build_model, checkpoint_names
    from shardserve_sharding.models.llama import LlamaConfig
    from shardserve_sharding.reshard import reshard
    from shardserve_sharding.tokenizer import train_bpe

    tok = train_bpe(TINY_CORPUS, vocab_size=320)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=6, n_kv_heads=3,
                      intermediate_size=96, rope_theta=10000.0, tie_embeddings=False,
                      max_seq_len=512)
    torch.manual_seed(7)
    model = build_model("llama", cfg)
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    tp1 = root / "tp1"
    write_checkpoint(tp1, family="llama", config=cfg.to_dict(),
                     tensors=((n, params[n].detach()) for n in names),
                     specs=[TensorSpec(n, torch.float32, tuple(params[n].shape)) for n in names],
                     tokenizer=tok, source={"format": "test-random", "seed": 7})
    tp3 = root / "tp3"
    reshard(tp1, tp3, tp=3)
    return tp1, tp3


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory) -> tuple[Path, Path]:
    return _tp3_model(tmp_path_factory.mktemp("tp3"))


@pytest.fixture(scope="module")
def netns_group(tmp_path_factory, tp_models):
    why = _cannot_netns()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("netns")
    tp1, tp3 = tp_models
    hosts = Hosts()
    server = None
    try:
        hosts.up()
        join = f"{hosts.addr['A']}:{RDV_PORT}"
        for h, rank in (("B", "1"), ("C", "2")):  # they wait for the front end to appear
            hosts.run(h, str(BIN / "shardserve"), "worker", "--join", join, "--model", str(tp3),
                      "--ranks", rank, "--threads", "1", log=root / f"worker{h}.log")
        server = RunningServer(
            tp3, "--host", f"unix:{root / 'grpc.sock'}", "--tp", "3", "--local-ranks", "1",
            "--rendezvous", join, "--pg-timeout", str(PG_TIMEOUT_S), "--dtype", "fp32",
            "--threads", "1", "--kv-cache-tokens", "2048", "--max-batch-size", "4",
            # slow steps: the 476 tokens left when the link goes down cannot finish first
            prefix=(*hosts.prefix("A"), "SHARDSERVE_FAULT_STEP_DELAY_S=0.01"), timeout=180)
        yield hosts, server, tp1, root
    finally:
        if server is not None:
            server.stop(30)
        hosts.down()


def _reference(tp1: Path, n: int) -> list[list[int]]:
    from shardserve_server.engine.local import LocalEngine
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    local = LocalEngine.from_checkpoint(str(tp1))
    reqs = [GenerationRequest(tuple(local.encode(p)), SamplingParams(temperature=0.0),
                              StoppingParams(max_new_tokens=n, ignore_eos=True), f"r{i}")
            for i, p in enumerate(PROMPTS)]
    return [list(r.token_ids) for r in local.generate(reqs)]


def _greedy(c: Client, n: int) -> list[list[int]]:
    return [list(c.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True,
                            timeout=60).token_ids) for p in PROMPTS]


def _logs(server: RunningServer, root: Path) -> str:
    workers = "".join((root / f"worker{h}.log").read_text()[-1500:] for h in "BC")
    return "server:\n" + "".join(server.log[-25:]) + "\nworkers:\n" + workers


def test_tp3_over_three_namespaces_matches_tp1(netns_group):
    hosts, server, tp1, root = netns_group
    want = _reference(tp1, 12)
    with server.client() as c:
        info = c.model_info()
        got = _greedy(c, 12)
    assert info.tensor_parallel == 3
    assert got == want, _logs(server, root)
    assert all(len(t) == 12 for t in got)


def test_link_down_fails_within_the_timeout_and_the_group_rejoins(netns_group):
    hosts, server, tp1, root = netns_group
    want = _reference(tp1, 12)
    with server.client() as c:
        assert c.health(READINESS)
        stream = c.generate_stream(PROMPTS[0], max_new_tokens=480, temperature=0,
                                   ignore_eos=True, timeout=120)
        got = 0
        t_down = None
        with pytest.raises(ShardserveError) as err:
            for chunk in stream:
                got += len(chunk.token_ids)
                if t_down is None and got >= 4:
                    hosts.link("C", "down")  # host C vanishes mid-stream
                    t_down = time.monotonic()
        failed_after = time.monotonic() - t_down
        print(f"link down after {got} tokens: UNAVAILABLE {failed_after:.2f} s later "
              f"(collective timeout {PG_TIMEOUT_S} s)")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        # the leader's collective times out after PG_TIMEOUT_S; allow for a loaded machine
        assert failed_after <= PG_TIMEOUT_S + 7, f"failed {failed_after:.1f} s after link down"
        assert got < 480
        assert poll(lambda: not c.health(READINESS), 10), "still ready without rank 2"

        hosts.link("C", "up")
        t_up = time.monotonic()
        assert poll(lambda: c.health(READINESS), 120), "no rejoin:\n" + _logs(server, root)
        print(f"link up: the group served again {time.monotonic() - t_up:.2f} s later")
        assert _greedy(c, 12) == want


def test_a_rank_with_another_checkpoint_is_refused(tp_models):
    """Loopback, no namespaces: ranks 1 and 2 join from a directory holding another checkpoint
    (the TP=1 copy: another manifest); the group's start fails naming the refusing rank."""
    import threading

    from grpc_servers import free_port

    from shardserve_server.workers.group import GroupDied, WorkerGroup
    from shardserve_server.workers.rendezvous import join_loop
    from shardserve_server.workers.worker import WorkerConfig

    tp1, tp3 = tp_models
    addr = f"127.0.0.1:{free_port()}"
    cfg = WorkerConfig(str(tp3), tp=3, threads=1, kv_cache_tokens=512, max_batch_size=2,
                       rendezvous=addr, local_ranks=1, pg_timeout_s=5)
    group = WorkerGroup(cfg, lambda msg: None, name="refusal")
    stop = threading.Event()
    joiner = threading.Thread(target=join_loop, args=(addr, str(tp1), [1, 2], 1, stop),
                              daemon=True)
    try:
        joiner.start()
        with pytest.raises(GroupDied, match="holds another checkpoint") as err:
            group.start(timeout=90)
    finally:
        stop.set()
        joiner.join(30)
        group.kill()
    assert str(tp1) in str(err.value)
    assert not joiner.is_alive()
