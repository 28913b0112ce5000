"""One farm per directory: ``OUT/farm.lock``, held with ``flock`` while ``up`` runs.

The kernel drops the lock with the process that holds it (exit, crash, kill -9), so a
left-over file never blocks a rerun; the file itself is kept (removing it would race
with the next ``up`` taking it). Inside: the holder's PID, directory and coordinator
URL, for the message that refuses a second ``up``. The descriptor is close-on-exec, so
the farm's children do not hold the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from types import TracebackType

from localfarm.errors import FarmBusy


class FarmLock:
    """``with FarmLock(out):`` the farm in ``out`` is ours, or ``FarmBusy`` is raised."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "farm.lock"
        self._fd: int | None = None

    def __enter__(self) -> FarmLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise FarmBusy(_refusal(self.out, holder)) from None
        self._fd = fd
        self.record()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def record(self, coordinator: str | None = None) -> None:
        """Write who holds the farm (and, once known, its coordinator URL)."""
        assert self._fd is not None
        data = json.dumps({"pid": os.getpid(), "out": str(self.out.resolve()),
                           "coordinator": coordinator}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)


def _read(fd: int) -> dict[str, object]:
    raw = os.pread(fd, 4096, 0)
    try:
        data = json.loads(raw)
    except ValueError:  # the holder is writing it right now
        return {}
    return data if isinstance(data, dict) else {}


def _refusal(out: Path, holder: dict[str, object]) -> str:
    pid = holder.get("pid", "unknown")
    url = holder.get("coordinator") or "not started yet"
    return (f"another `pairfarm up` is running on {holder.get('out', out)} (pid {pid}, "
            f"coordinator {url}); nothing was started. Stop it first (Ctrl-C in its "
            f"terminal, or kill -TERM {pid}) or use another --out.")
