"""RSS and CPU time of the worker processes (one per TP rank of each replica), read from /proc
at scrape time: the model lives there, not in the front end that the default process
collector describes.

`WorkerProcessCollector(pids)` exports `shardserve_worker_resident_memory_bytes` and
`shardserve_worker_cpu_seconds_total`, labelled `replica` and `rank`; `pids()` returns the
current `(replica, rank, pid)` tuples (a snapshot the event loop refreshes, so the scrape thread
never walks the engine's live state). A process that went away is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_proc(pid: int) -> tuple[float, float] | None:
    """(resident bytes, user + system CPU seconds) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None
    return float(rss), cpu


class WorkerProcessCollector(Collector):
    def __init__(self, pids: Callable[[], Iterable[tuple[int, int, int]]]) -> None:
        self._pids = pids

    def collect(self):
        rss = GaugeMetricFamily("shardserve_worker_resident_memory_bytes",
                                "Resident memory of each worker process",
                                labels=["replica", "rank"])
        cpu = CounterMetricFamily("shardserve_worker_cpu_seconds",
                                  "User + system CPU time of each worker process",
                                  labels=["replica", "rank"])
        for replica, rank, pid in self._pids():
            got = read_proc(pid)
            if got is None:
                continue
            labels = [str(replica), str(rank)]
            rss.add_metric(labels, got[0])
            cpu.add_metric(labels, got[1])
        yield rss
        yield cpu
