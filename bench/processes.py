"""CPU time of process trees the benchmarks start but do not wait for.

``ServerCpu``: a PostgreSQL server's processes. ``pg_ctl start`` leaves the postmaster
to init, so its CPU is not in the resources of the process that started it (``wait4``);
it is read from ``/proc`` instead. ``PostmasterCpu`` finds the postmaster of a data
directory once it runs and keeps the last figure read, for a server that a benchmarked
command starts and stops itself (``pairfarm up``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class ServerCpu:
    """CPU seconds of a PostgreSQL server's processes so far: the postmaster, its live
    children, and its children that have exited (counted in the postmaster's cutime)."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(entry.name), int(fields[1])
            if pid == self.postmaster:
                total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            elif ppid == self.postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / self.tick


class PostmasterCpu(threading.Thread):
    """The CPU seconds of the PostgreSQL server on ``datadir`` (``postmaster.pid``), read
    every ``interval`` seconds until ``done`` is set: the last figure read, so the CPU
    of its last ``interval`` before it stopped is missed."""

    def __init__(self, datadir: Path, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.datadir = datadir
        self.interval = interval
        self.seconds = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        cpu: ServerCpu | None = None
        while not self.done.wait(self.interval):
            if cpu is None:
                cpu = self._server()
            if cpu is not None and Path(f"/proc/{cpu.postmaster}").exists():
                self.seconds = max(self.seconds, cpu.seconds())

    def _server(self) -> ServerCpu | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return ServerCpu(int(first)) if first.strip().isdigit() else None
