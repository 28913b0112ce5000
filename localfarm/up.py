"""``pairfarm up``: a whole farm on one machine, run to completion.

::

    embedded PostgreSQL (or DATABASE_URL) --migrate--> ingest FILES
      -> pairfarm coordinator  (child)
      -> pairfarm worker x N   (children)  -> OUT/shards/
      -> pairfarm postprocess  (child, --postprocess) -> OUT/postprocessed/
      watch: restart dead children, restart a dead PostgreSQL on its port, show progress;
      done when no candidate waits for a download (nor a shard for post-processing).

Everything lives in OUT: ``pg/`` (database), ``shards/``, ``postprocessed/``, ``logs/``,
``tokens.json`` (the farm's own tokens, mode 0600), ``farm.json`` (ports, kept across runs
so that a rerun resumes on the same URLs) and ``run.json`` (PIDs of the running children).
Running ``up`` again on the same OUT resumes: ingest inserts nothing new, expired or
released batches are leased again, finished shards are kept.

Start-up: the coordinator starts during the ingest when the batch size is given (else
once the ingest is done), the workers and post-processing right after it: they load
while it does and register once it answers.

Batch size: an explicit ``batch_size`` is passed to the coordinator as it is. Without one
(``None``), ``farm_batch_size`` sizes batches to the input and the workers once ingest is
done (``coordinator.settings.auto_batch_size``: about 4 batches per worker, 100..10,000),
never below the largest batch still waiting (a smaller size would never lease it again).

One farm per directory: ``farm.lock`` (lock.py) is held while ``up`` runs; a second
``up`` on the same OUT raises ``FarmBusy`` before starting anything. SIGINT / SIGTERM stop
the farm in order, workers first and the database last (stopping.py), and raise
``FarmStopped`` with what the stop did.

Error handling: a child that dies is restarted (``max_restarts`` times in all); the
database going away is waited for and, when it is ours, restarted; a failed ingest or a
coordinator that never answers raises ``StartupFailed``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from coordinator.embedded_pg import EmbeddedPostgres, read_running
from coordinator.errors import CoordinatorError
from localfarm.children import Child, Supervisor, pairfarm_argv
from localfarm.errors import ChildFailed, StartupFailed
from localfarm.lock import FarmLock
from localfarm.progress import FarmProgress, is_finished
from localfarm.stopping import (
    FarmStopped,
    Shutdown,
    StopRequested,
    StopSignals,
    StopTimes,
    stop_farm,
)
from pairfarm.client import ClientError, CoordinatorClient
from pairfarm.protocol import FarmStats

log = logging.getLogger("pairfarm.up")
DATABASE = "pairfarm"
#: the workers' longest wait between tries to reach the coordinator (``--backoff-cap``):
#: they start with it and register within this of its first answer, and a coordinator
#: that ``up`` restarted is found again as soon
WORKER_BACKOFF_CAP_S = 0.5


@dataclass(frozen=True)
class UpSettings:
    inputs: tuple[Path, ...]
    out: Path
    workers: int = 2
    postprocess: bool = False
    database_url: str | None = None
    port: int = 8600
    #: None: sized to the candidates waiting and the workers (``farm_batch_size``)
    batch_size: int | None = None
    lease_ttl_s: float = 120.0
    reap_interval_s: float = 2.0
    poll_s: float = 0.5
    max_restarts: int = 50
    drain_timeout_s: float = 60.0
    #: the coordinator's ``--url-retries`` / ``--url-retry-delay``: none by default, so
    #: that a run ends once every URL was tried (a retry would keep it waiting)
    url_retries: int = 0
    url_retry_delay_s: float = 60.0
    release_s: float = 45.0
    stop_grace_s: float = 60.0
    progress: bool = True
    ingest_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    postprocess_args: tuple[str, ...] = ()


@dataclass
class FarmResult:
    stats: FarmStats
    out: Path
    dashboard: str
    restarts: int
    seconds: float
    shutdown: Shutdown


@dataclass
class _Database:
    url: str
    embedded: EmbeddedPostgres | None = None
    port: int | None = None
    started_here: bool = False

    def ensure_running(self) -> bool:
        """Restart our embedded server if it died; True if it had to."""
        if self.embedded is None or read_running(self.embedded.datadir) is not None:
            return False
        log.warning("PostgreSQL is down: restarting it on port %s", self.port)
        try:
            self.embedded.start(port=self.port)
        except CoordinatorError as exc:  # e.g. the old server's memory not released yet
            log.warning("PostgreSQL did not restart yet: %s", exc)
            return False
        return True


@dataclass
class _State:
    """``farm.json``: what a rerun on the same directory must find again."""

    path: Path
    data: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _State:
        data = json.loads(path.read_text()) if path.exists() else {}
        return cls(path, data)

    def port(self, key: str, wanted: int) -> int:
        if key not in self.data:
            self.data[key] = wanted or _free_port()
            self.path.write_text(json.dumps(self.data))
        return self.data[key]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- set-up ---------------------------------------------------------------------------------

def open_database(settings: UpSettings, state: _State) -> _Database:
    from coordinator.db import ensure_database
    from coordinator.migrate import upgrade

    if settings.database_url:
        upgrade(settings.database_url)
        return _Database(url=settings.database_url)
    pg = EmbeddedPostgres(settings.out / "pg")
    was_running = pg.datadir.exists() and read_running(pg.datadir) is not None
    server = pg.start(port=state.port("pg_port", 0))
    ensure_database(server.url(), DATABASE)
    url = server.url(DATABASE)
    upgrade(url)
    return _Database(url=url, embedded=pg, port=server.port, started_here=not was_running)


def farm_tokens(settings: UpSettings, database_url: str) -> dict[str, str]:
    """The farm's tokens (admin, one per worker, gpu), created once and kept in OUT."""
    from coordinator.db import make_engine
    from coordinator.tokens import create_token

    path = settings.out / "tokens.json"
    tokens: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = {"admin": "admin", "gpu": "gpu"}
    wanted |= {f"worker-{i}": "worker" for i in range(1, settings.workers + 1)}
    missing = {name: role for name, role in wanted.items() if name not in tokens}
    if missing:
        engine = make_engine(database_url, pool_size=1)
        try:
            for name, role in missing.items():
                tokens[name] = create_token(engine, role, f"up-{name}")[1]
        finally:
            engine.dispose()
        path.touch(mode=0o600)
        path.write_text(json.dumps(tokens, indent=1))
    return tokens


def ingest(settings: UpSettings, database_url: str) -> None:
    import subprocess

    if not settings.inputs:
        return
    argv = pairfarm_argv("ingest", "--database-url", database_url, *settings.ingest_args,
                         *map(str, settings.inputs))
    if subprocess.run(argv, check=False).returncode != 0:
        raise StartupFailed("ingest failed (its message is above); the farm was not started")


def farm_batch_size(settings: UpSettings, database_url: str) -> int:
    """The coordinator's batch size: ``settings.batch_size`` when given, else sized to the
    candidates waiting for a download and the workers, and never below the largest batch
    still waiting."""
    if settings.batch_size is not None:
        return settings.batch_size
    from coordinator.db import make_engine
    from coordinator.queries import Q
    from coordinator.settings import auto_batch_size
    from coordinator.stats import farm_stats

    engine = make_engine(database_url, pool_size=1)
    try:
        waiting = farm_stats(engine, alive_window_s=0).candidates_pending
        with engine.connect() as conn:
            largest = int(conn.execute(Q.largest_waiting_batch).scalar_one())
    finally:
        engine.dispose()
    size = max(auto_batch_size(waiting, settings.workers), largest)
    log.info("batch size %d: %d candidates waiting, %d workers", size, waiting,
             settings.workers)
    return size


def _env() -> dict[str, str]:
    """The children's environment: ours, minus settings meant for another role."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PAIRFARM_") and k != "DATABASE_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def coordinator_child(settings: UpSettings, db: _Database, port: int,
                      batch_size: int) -> Child:
    argv = pairfarm_argv(
        "coordinator", "--database-url", db.url, "--host", "127.0.0.1", "--port", str(port),
        "--batch-size", str(batch_size), "--lease-ttl", str(settings.lease_ttl_s),
        "--reap-interval", str(settings.reap_interval_s), "--no-migrate",
        "--url-retries", str(settings.url_retries),
        "--url-retry-delay", str(settings.url_retry_delay_s))
    return Child("coordinator", argv, _env(), settings.out / "logs" / "coordinator.log")


def worker_child(settings: UpSettings, url: str, token: str, i: int) -> Child:
    argv = pairfarm_argv(
        "worker", "--coordinator", url, "--token", token, "--name", f"up-worker-{i}",
        "--output", str(settings.out / "shards"), "--idle-poll", "1", "--idle-poll-max", "1",
        "--no-progress", "--backoff-cap", str(WORKER_BACKOFF_CAP_S), *settings.worker_args)
    return Child(f"worker-{i}", argv, _env(), settings.out / "logs" / f"worker-{i}.log")


def postprocess_child(settings: UpSettings, url: str, token: str) -> Child:
    argv = pairfarm_argv(
        "postprocess", "--coordinator", url, "--token", token,
        "--out", str(settings.out / "postprocessed"), "--poll-interval", "1",
        "--workdir", str(settings.out / "postprocess-work"), *settings.postprocess_args)
    return Child("postprocess", argv, _env(), settings.out / "logs" / "postprocess.log")


def wait_healthy(url: str, child: Child, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise StartupFailed(f"the coordinator exited: see {child.log_path}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StartupFailed(f"the coordinator did not answer within {timeout:.0f} s")


# -- the run ----------------------------------------------------------------------------------

@dataclass
class _Farm:
    """The running farm's parts, and what stopping it did."""

    settings: UpSettings
    signals: StopSignals
    supervisor: Supervisor
    url: str = ""
    client: CoordinatorClient | None = None
    shutdown: Shutdown | None = None

    def stop(self) -> Shutdown:
        """Stop the children in order (stopping.py), once."""
        if self.shutdown is None:
            s = self.settings
            times = StopTimes(drain_timeout_s=s.drain_timeout_s, release_s=s.release_s,
                              stop_grace_s=s.stop_grace_s)
            self.shutdown = stop_farm(self.supervisor, self.client, times, self.signals)
            self.supervisor.run_file.unlink(missing_ok=True)
            if self.client is not None:
                self.client.close()
        return self.shutdown


@contextmanager
def _farm(settings: UpSettings, signals: StopSignals) -> Iterator[tuple[_Farm, _Database]]:
    settings.out.mkdir(parents=True, exist_ok=True)
    with FarmLock(settings.out) as lock:
        state = _State.load(settings.out / "farm.json")
        db = open_database(settings, state)
        farm = _Farm(settings, signals, Supervisor(run_file=settings.out / "run.json"))
        try:
            tokens = farm_tokens(settings, db.url)
            port = state.port("coordinator_port", settings.port)
            url = farm.url = f"http://127.0.0.1:{port}"
            lock.record(url)
            farm.client = CoordinatorClient(url, tokens["admin"])
            coord = None
            if settings.batch_size is not None:  # known: the coordinator starts during the ingest
                coord = farm.supervisor.add(
                    coordinator_child(settings, db, port, settings.batch_size))
            ingest(settings, db.url)
            if coord is None:  # sized to what the ingest left waiting
                coord = farm.supervisor.add(
                    coordinator_child(settings, db, port, farm_batch_size(settings, db.url)))
            # the clients start with the coordinator: they load while it does, and
            # register once it answers (WORKER_BACKOFF_CAP_S between their tries)
            for i in range(1, settings.workers + 1):
                farm.supervisor.add(worker_child(settings, url, tokens[f"worker-{i}"], i))
            if settings.postprocess:
                farm.supervisor.add(postprocess_child(settings, url, tokens["gpu"]))
            wait_healthy(url, coord)
            yield farm, db
        except StopRequested as exc:
            raise FarmStopped(str(exc), farm.stop(), settings.out) from None
        finally:
            farm.stop()
            if db.embedded is not None and db.started_here:
                db.embedded.stop()


def _watch(settings: UpSettings, farm: _Farm, db: _Database,
           progress: FarmProgress) -> FarmStats:
    """Keep the farm alive until it is finished; the last stats."""
    last: FarmStats | None = None
    assert farm.client is not None
    while True:
        db.ensure_running()
        farm.supervisor.revive()
        if farm.supervisor.restarts > settings.max_restarts:
            raise ChildFailed(f"children died {farm.supervisor.restarts} times: see "
                              f"{settings.out / 'logs'}")
        try:
            last = farm.client.stats()
        except ClientError as exc:
            log.info("stats unavailable: %s", exc)
        if last is not None:
            progress.update(last)
            if is_finished(last, postprocess=settings.postprocess):
                return last
        time.sleep(settings.poll_s)


def run_farm(settings: UpSettings) -> FarmResult:
    """Run the farm until every candidate has its outcome (see the module docstring).

    Raises ``FarmStopped`` (with what the stop did) on SIGINT / SIGTERM, ``FarmBusy`` when
    another ``up`` runs on the same directory.
    """
    started = time.monotonic()
    signals = StopSignals()
    with signals.installed(), _farm(settings, signals) as (farm, db):
        dashboard = f"{farm.url}/"
        with FarmProgress(enabled=settings.progress, postprocess=settings.postprocess,
                          dashboard=dashboard) as progress:
            stats = _watch(settings, farm, db, progress)
    return FarmResult(stats=stats, out=settings.out, dashboard=dashboard,
                      restarts=farm.supervisor.restarts, seconds=time.monotonic() - started,
                      shutdown=farm.stop())
