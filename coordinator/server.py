"""``pairfarm coordinator``: the API on uvicorn, over the embedded or a given Postgres.

One process (``processes=1``) serves the app in this process. Several (``--processes N``)
share one listening socket: this process starts the embedded PostgreSQL and migrates it
(or checks a ``DATABASE_URL`` schema) once, binds the socket, and uvicorn's supervisor
spawns N server processes on it (a process that dies is replaced). Each server process
builds its own engine (pool), ``SeenCache`` and reaper; the reapers take turns through an
advisory lock (``Leases.reap_expired``). The Prometheus counters of all N are summed at
each scrape from files in a private ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode), so whichever process answers ``/metrics`` gives the totals.

Resource handling: the embedded server (no ``DATABASE_URL``) is started, migrated and
stopped again when uvicorn exits (SIGINT / SIGTERM shut down gracefully, the server
processes first); each engine's pool is disposed on exit; the reaper thread lives as long
as its app; the metrics directory is removed on exit.
Error handling: an unmigrated ``DATABASE_URL`` database is refused with a message naming
``pairfarm db upgrade``; a server process that fails at start stops the supervisor.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import sqlalchemy as sa

from coordinator.db import make_engine, open_database
from coordinator.errors import DatabaseUnavailable
from coordinator.migrate import current_revision, head_revision
from coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)
#: the variable prometheus_client reads, when it is imported, to count in shared files
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: the open files asked for when the hard limit is unlimited
OPEN_FILES = 1 << 20


def check_schema(url: str) -> None:
    try:
        current = current_revision(url)
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {exc.orig}") from exc
    head = head_revision()
    if current != head:
        raise DatabaseUnavailable(
            f"the database schema is at {current or 'nothing'}, this coordinator needs "
            f"{head}: run 'pairfarm db upgrade' (or start with --migrate)")


class Stopped(SystemExit):
    """SIGTERM: leave through every ``finally`` and exit 0."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM raise ``Stopped`` in the main thread.

    uvicorn shuts down gracefully on SIGTERM and then raises the signal again under the
    handler it found at start; with the default handler that would kill the process
    before the embedded PostgreSQL is stopped and the pool disposed.
    """

    def handler(signum: int, frame: object) -> None:
        raise Stopped(0)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Stopped:
        log.info("stopped by SIGTERM")
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (inherited by the
    server processes): each kept-alive client holds a descriptor, and thousands of
    workers pass the usual soft limit of 1,024. The limit in force is returned."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, wanted, exc)
        return soft
    log.debug("open files limit raised from %d to %d", soft, wanted)
    return wanted


def serve(settings: CoordinatorSettings, *, migrate: bool = False,
          log_level: str = "info", processes: int = 1) -> None:
    raise_open_files_limit()
    with sigterm_unwinds(), open_database(settings, migrate=migrate) as url:
        check_schema(url)
        if processes == 1:
            _serve_one(settings, url, log_level)
        else:
            _serve_many(settings, url, log_level, processes)


def _uvicorn_config(settings: CoordinatorSettings, app: object, log_level: str,
                    **extra: object) -> object:
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port,  # type: ignore[arg-type]
                          log_level=log_level, access_log=log_level == "debug",
                          timeout_keep_alive=settings.keep_alive_s,
                          timeout_graceful_shutdown=10, **extra)  # type: ignore[arg-type]


def _serve_one(settings: CoordinatorSettings, url: str, log_level: str) -> None:
    import uvicorn

    from coordinator.api import create_app

    engine = make_engine(url)
    try:
        config = _uvicorn_config(settings, create_app(settings, engine), log_level)
        uvicorn.Server(config).run()  # type: ignore[arg-type]
    finally:
        engine.dispose()


def _serve_many(settings: CoordinatorSettings, url: str, log_level: str,
                processes: int) -> None:
    """N spawned server processes on one socket bound here, counting metrics in a fresh
    directory (set in the environment the processes inherit, before they import
    prometheus_client)."""
    from uvicorn.supervisors import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="pairfarm-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        config = _uvicorn_config(settings, partial(process_app, settings, url, metrics_dir),
                                 log_level, factory=True, workers=processes)
        sock = config.bind_socket()  # type: ignore[attr-defined]
        try:
            Multiprocess(config, sockets=[sock]).run()  # type: ignore[arg-type]
        finally:
            sock.close()
    finally:
        _restore_env(MULTIPROC_ENV, previous)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def process_app(settings: CoordinatorSettings, url: str, metrics_dir: str) -> FastAPI:
    """The app of one server process of ``--processes N`` (called in that process): its
    own engine, named after the process in ``pg_stat_activity``, disposed on exit."""
    from coordinator.api import create_app

    named = sa.engine.make_url(url).update_query_dict(
        {"application_name": f"pairfarm coordinator {os.getpid()}"})
    engine = make_engine(named.render_as_string(hide_password=False))
    return create_app(settings, engine, metrics_dir=metrics_dir, on_exit=engine.dispose)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
