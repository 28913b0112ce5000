"""Connections to the coordinator's database, embedded or given by ``DATABASE_URL``.

Resource handling: ``open_database`` is a context manager that yields a URL; when it had to
start the embedded server it stops it again on exit, unless asked to keep it running.
``make_engine`` returns an engine the caller disposes.

Error handling: connection failures become ``DatabaseUnavailable`` here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg import sql

from coordinator.embedded_pg import EmbeddedPostgres, read_running
from coordinator.errors import DatabaseUnavailable
from coordinator.migrate import upgrade
from coordinator.settings import DEFAULT_DATABASE, CoordinatorSettings


def make_engine(url: str, *, pool_size: int = 20) -> sa.Engine:
    return sa.create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True,
                            pool_recycle=3600)


def libpq_url(url: str) -> str:
    """The URL without SQLAlchemy's driver suffix, for psycopg.connect."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def raw_connection(url: str) -> Iterator[psycopg.Connection]:
    """A plain psycopg connection in autocommit (COPY and bulk work), closed on exit; an
    unreachable server is ``DatabaseUnavailable``."""
    try:
        conn = psycopg.connect(libpq_url(url), autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
    with conn:
        yield conn


def ensure_database(server_url: str, name: str) -> None:
    """Create database ``name`` on the server of ``server_url`` if it does not exist."""
    try:
        with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL: {exc}") from exc


@contextmanager
def open_database(settings: CoordinatorSettings, *, migrate: bool,
                  keep_running: bool = False) -> Iterator[str]:
    """Yield the database URL: ``settings.database_url``, or the embedded server's.

    The embedded server (in ``settings.data_dir``) is started if needed, its ``pairfarm``
    database created and migrated (always: it is ours). A ``DATABASE_URL`` database is
    migrated only when ``migrate`` is true.
    """
    if settings.database_url:
        if migrate:
            upgrade(settings.database_url)
        yield settings.database_url
        return
    pg = EmbeddedPostgres(Path(settings.data_dir))
    was_running = read_running(pg.datadir) is not None if pg.datadir.exists() else False
    server = pg.start()
    try:
        ensure_database(server.url(), DEFAULT_DATABASE)
        url = server.url(DEFAULT_DATABASE)
        upgrade(url)
        yield url
    finally:
        if not was_running and not keep_running:
            pg.stop()
