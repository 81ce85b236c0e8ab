"""Multi-host worker groups: rendezvous through torch.distributed's TCPStore.

A group whose ranks span hosts has one rendezvous address HOST:PORT (`serve --rendezvous`).
The front end holds a TCPStore server there for the life of its process. Every start of the
group is a new *generation* g (a restart after a failure is the next one):

    front end:  g = add("generation", 1); set("g{g}/cfg", WorkerConfig as JSON); set("gen", g)
    every rank: check its manifest against cfg's fingerprint
                  -> set("g{g}/refused/{rank}", reason) and exit, or set("g{g}/joined/{rank}")
                wait until every rank joined, then init_process_group(store=PrefixStore("g{g}/"))

Remote hosts run `shardserve worker --join HOST:PORT --ranks ...` (`join_loop`): it waits for a
generation it has not served, starts its ranks with that generation's config (and its own
model directory), and goes back to waiting once they exit (a collective timeout when a host
vanished, or a newer generation). The front end's leader is rank 0 and always runs there.
Collectives of a generation whose rank disappeared time out after `pg_timeout_s`, the group
dies, in-flight requests fail, and the front end publishes the next generation; the group
serves again as soon as every host has joined it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import sys
import threading
import time
import uuid
from dataclasses import asdict, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger("shardserve.rendezvous")

POLL_S = 0.2


class RankRefused(RuntimeError):
    """A rank refused to join its group (another checkpoint, or a bad config)."""


def split_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); ValueError names what is wrong."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous address must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def manifest_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the checkpoint's manifest.json content (canonical JSON): the same for every
    copy of one checkpoint at one layout (it lists every file's sha256), different otherwise."""
    path = Path(model_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RankRefused(f"{path}: unreadable manifest ({e})") from e
    canon = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canon).hexdigest()


def config_to_json(cfg: Any) -> str:
    return json.dumps(asdict(cfg))


def config_from_json(text: str | bytes, cls: Any) -> Any:
    data = json.loads(text)
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def client_store(addr: str, timeout_s: float) -> Any:
    import torch.distributed as dist

    host, port = split_addr(addr)
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


class Rendezvous:
    """The front end's TCPStore server (one per address and process, kept across restarts)."""

    _open: dict[str, Rendezvous] = {}
    _lock = threading.Lock()

    def __init__(self, addr: str) -> None:
        import torch.distributed as dist

        host, port = split_addr(addr)
        self.addr = addr
        try:
            self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=30))
        except RuntimeError as e:  # DistNetworkError: port in use, address not ours
            raise OSError(f"cannot serve the rendezvous at {addr}: "
                          f"{str(e).strip().splitlines()[-1]}") from None
        # joined workers notice a restarted front end (whose generations start over) by this
        self.store.set("session", uuid.uuid4().hex)

    @classmethod
    def at(cls, addr: str) -> Rendezvous:
        with cls._lock:
            if addr not in cls._open:
                cls._open[addr] = cls(addr)
            return cls._open[addr]

    def publish(self, cfg: Any) -> int:
        """Open the next generation with cfg (its `generation` field is set here)."""
        gen = int(self.store.add("generation", 1))
        cfg = replace(cfg, generation=gen)
        self.store.set(f"g{gen}/cfg", config_to_json(cfg))
        self.store.set("gen", str(gen))
        return gen

    def refused(self, gen: int, ranks: range) -> str | None:
        """The first refusal of generation gen by one of ranks, or None."""
        for r in ranks:
            key = f"g{gen}/refused/{r}"
            if self.store.check([key]):
                return self.store.get(key).decode()
        return None

    def missing(self, gen: int, ranks: range) -> list[int]:
        return [r for r in ranks if not self.store.check([f"g{gen}/joined/{r}"])]


def check_in(store: Any, cfg: Any, rank: int, latest: Any = None) -> None:
    """Join generation cfg.generation on store (a PrefixStore of it): refuse on a manifest
    mismatch, else announce and wait until all cfg.tp ranks have joined (no limit: the front
    end's start timeout bounds it; a rank left over from an older generation gives up when
    `latest`, the unprefixed store, shows a newer one)."""
    try:
        mine = manifest_fingerprint(cfg.model_dir)
        if cfg.manifest_sha256 and mine != cfg.manifest_sha256:
            raise RankRefused(
                f"rank {rank}: {cfg.model_dir} holds another checkpoint (manifest sha256 "
                f"{mine[:12]}, the front end serves {cfg.manifest_sha256[:12]})")
    except RankRefused as e:
        store.set(f"refused/{rank}", str(e))
        raise
    store.set(f"joined/{rank}", mine)
    keys = [f"joined/{r}" for r in range(cfg.tp)]
    while not store.check(keys):
        if latest is not None and int(latest.get("gen")) > cfg.generation:
            raise RankRefused(f"rank {rank}: generation {cfg.generation} was superseded")
        for r in range(cfg.tp):
            if store.check([f"refused/{r}"]):  # the group cannot form: say why
                raise RankRefused(store.get(f"refused/{r}").decode())
        time.sleep(POLL_S)


def _rank_main(cfg: Any, rank: int) -> None:
    from .worker import worker_main

    worker_main(cfg, rank, None)


def join_loop(addr: str, model_dir: str, ranks: list[int], threads: int | None = None,
              stop: threading.Event | None = None, connect_timeout_s: float = 5.0) -> int:
    """`shardserve worker --join`: serve ranks of every new generation published at addr,
    until stop is set (or forever). Reconnects when the front end is unreachable."""
    from .worker import WorkerConfig

    stop = stop or threading.Event()
    ctx = mp.get_context("spawn")
    served, procs, session = 0, [], None
    waiting_logged = False
    while not stop.is_set():
        try:
            store = client_store(addr, connect_timeout_s)
        except Exception as e:  # unreachable, refused, timed out: try again
            if not waiting_logged:
                log.info("waiting for the front end at %s (%s)", addr, str(e).splitlines()[0])
                waiting_logged = True
            stop.wait(1.0)
            continue
        waiting_logged = False
        log.info("connected to %s; serving ranks %s", addr, ranks)
        try:
            while not stop.is_set():
                now = store.get("session").decode() if store.check(["session"]) else None
                if now != session:  # the front end restarted: its generations start over
                    session, served = now, 0
                gen = int(store.get("gen")) if store.check(["gen"]) else 0
                if gen > served:
                    _end(procs, "a newer generation was published")
                    cfg = config_from_json(store.get(f"g{gen}/cfg"), WorkerConfig)
                    bad = [r for r in ranks if not 0 < r < cfg.tp]
                    if bad:
                        raise SystemExit(f"shardserve worker: ranks {bad} are not follower "
                                         f"ranks of a TP={cfg.tp} group (1..{cfg.tp - 1})")
                    cfg = replace(cfg, model_dir=model_dir,
                                  threads=threads or cfg.threads)
                    procs = []
                    for r in ranks:
                        p = ctx.Process(target=_rank_main, args=(cfg, r), daemon=True,
                                        name=f"shardserve-join-g{gen}-rank{r}")
                        p.start()
                        procs.append(p)
                    served = gen
                    log.info("generation %d: started ranks %s", gen, ranks)
                for p in [p for p in procs if not p.is_alive()]:
                    log.info("%s exited with code %s", p.name, p.exitcode)
                    procs.remove(p)
                stop.wait(0.5)
        except SystemExit:
            _end(procs, "stopping")
            raise
        except Exception as e:  # lost the front end (store error or timeout): reconnect
            log.warning("lost the front end at %s: %s", addr, str(e).splitlines()[0])
            stop.wait(1.0)
    _end(procs, "stopping")
    return 0


def _end(procs: list, why: str) -> None:
    for p in procs:
        if p.is_alive():
            log.info("stopping %s: %s", p.name, why)
            p.kill()
    for p in procs:
        p.join(5)
    procs.clear()


def main_join(addr: str, model_dir: str, ranks: list[int], threads: int | None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return join_loop(addr, model_dir, ranks, threads, stop)
