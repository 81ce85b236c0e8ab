"""Front-end side of one worker group: spawn its TP ranks, talk to the leader, notice death.

A multi-host group (cfg.rendezvous set) starts only its local ranks here and opens a new
generation of the rendezvous (rendezvous.py) for the others to join; a refusal (another
checkpoint) fails the start with the refusing rank's reason.

A reader thread forwards every leader message (protocol.StepOutputs, Fatal) to `on_message`;
a monitor thread polls the processes and reports protocol.GroupDead as soon as any rank exits,
after killing the others (a group with a missing rank cannot step). Restarting is the caller's
decision (AsyncEngine).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .protocol import Fatal, FromLeader, GroupDead, Ready, StopGroup, ToLeader
from .worker import WorkerConfig, worker_main

log = logging.getLogger("shardserve.group")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GroupDied(RuntimeError):
    """The worker group lost a rank (crash, kill, or a collective timeout)."""


class WorkerGroup:
    def __init__(self, cfg: WorkerConfig, on_message: Callable[[FromLeader | GroupDead], None],
                 name: str = "group0") -> None:
        self.cfg, self.on_message, self.name = cfg, on_message, name
        self.procs: list[Any] = []
        self.conn: Any = None
        self.ready_info: Ready | None = None
        self._dead = threading.Event()
        self._ready = threading.Event()
        self._eof = threading.Event()  # the reader reached the end of the leader's pipe
        self._fatal: str | None = None  # the leader's Fatal message, if it sent one
        self._lock = threading.Lock()
        self._closing = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, timeout: float = 300.0) -> Ready:
        """Spawn the ranks and wait for the leader's ready message (blocking)."""
        ctx = mp.get_context("spawn")
        cfg = self.cfg
        if cfg.tp > 1 and not cfg.master_port and not cfg.rendezvous:
            cfg = replace(cfg, master_port=free_port())
        rdv, gen, local = None, 0, range(cfg.tp)
        if cfg.rendezvous:  # a multi-host group: open the next generation, start our ranks
            from .rendezvous import Rendezvous, manifest_fingerprint

            rdv = Rendezvous.at(cfg.rendezvous)
            if not cfg.manifest_sha256:
                cfg = replace(cfg, manifest_sha256=manifest_fingerprint(cfg.model_dir))
            gen = rdv.publish(cfg)
            cfg = replace(cfg, generation=gen)
            local = range(cfg.local_ranks or cfg.tp)
        remote = range(len(local), cfg.tp)
        parent, child = ctx.Pipe(duplex=True)
        self.conn = parent
        for rank in local:
            p = ctx.Process(target=worker_main, args=(cfg, rank, child if rank == 0 else None),
                            name=f"shardserve-{self.name}-rank{rank}", daemon=True)
            p.start()
            self.procs.append(p)
        child.close()
        threading.Thread(target=self._read, name=f"{self.name}-reader", daemon=True).start()
        threading.Thread(target=self._monitor, name=f"{self.name}-monitor", daemon=True).start()
        t0 = time.monotonic()
        deadline, next_note = t0 + timeout, t0 + 5.0
        while not self._ready.wait(0.1):
            refusal = rdv.refused(gen, range(cfg.tp)) if rdv is not None else None
            if refusal:
                self._closing = True  # a start failure, raised here, not a death report
                self._die(refusal)
                raise GroupDied(f"{self.name}: {refusal}")
            if self._dead.is_set():
                raise GroupDied(f"{self.name}: failed to start: {self.death_reason}")
            if time.monotonic() > deadline:
                self.kill()
                raise GroupDied(f"{self.name}: not ready after {timeout:.0f} s")
            if rdv is not None and time.monotonic() > next_note:
                missing = rdv.missing(gen, remote)
                if missing:
                    log.info("%s generation %d: waiting for ranks %s to join %s",
                             self.name, gen, missing, cfg.rendezvous)
                next_note = time.monotonic() + 5.0
        assert self.ready_info is not None
        return self.ready_info

    death_reason = ""

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._dead.is_set():
                return
            self.death_reason = reason
            self._dead.set()
        self.kill()
        if not self._closing:
            self.on_message(GroupDead(reason))

    def _read(self) -> None:
        fatal = None
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Ready):
                self.ready_info = msg
                self._ready.set()
                continue
            if isinstance(msg, Fatal):
                fatal = msg.message
            self.on_message(msg)
        # every message the leader sent is delivered (ahead of GroupDead); give the monitor a
        # moment to name the rank that exited and its code
        self._fatal = fatal
        self._eof.set()
        time.sleep(0.3)
        self._die(fatal or "leader connection closed")

    def _monitor(self) -> None:
        while not self._dead.is_set():
            for rank, p in enumerate(self.procs):
                if not p.is_alive():
                    # let the reader drain what the leader sent before it went (finished
                    # results, its Fatal message) so that GroupDead comes after them
                    self._eof.wait(0.5)
                    self._die(self._fatal or f"rank {rank} (pid {p.pid}) exited with code "
                              f"{p.exitcode}")
                    return
            time.sleep(0.1)

    def send(self, msg: ToLeader) -> None:
        if self._dead.is_set():
            raise GroupDied(f"{self.name}: {self.death_reason}")
        try:
            self.conn.send(msg)
        except (OSError, BrokenPipeError) as e:
            self._die(f"pipe to leader broken: {e}")
            raise GroupDied(f"{self.name}: {self.death_reason}") from e

    @property
    def dead(self) -> bool:
        return self._dead.is_set()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the leader to stop (followers stop with it), then make sure all are gone."""
        self._closing = True
        try:
            if not self._dead.is_set():
                self.conn.send(StopGroup())
        except (OSError, BrokenPipeError):
            pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self._dead.set()
        self.kill()
