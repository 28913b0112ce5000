"""``pairfarm coordinator``: the API on uvicorn, over the embedded or a given Postgres.

Resource handling: the embedded server (no ``DATABASE_URL``) is started, migrated and
stopped again when uvicorn exits (SIGINT / SIGTERM shut down gracefully); the engine's
pool is disposed on exit; the reaper thread lives as long as the app.
Error handling: an unmigrated ``DATABASE_URL`` database is refused with a message naming
``pairfarm db upgrade``.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from coordinator.db import make_engine, open_database
from coordinator.errors import DatabaseUnavailable
from coordinator.migrate import current_revision, head_revision
from coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)


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


def serve(settings: CoordinatorSettings, *, migrate: bool = False,
          log_level: str = "info") -> None:
    import uvicorn

    from coordinator.api import create_app

    with open_database(settings, migrate=migrate) as url:
        check_schema(url)
        engine = make_engine(url)
        try:
            app = create_app(settings, engine)
            config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                    log_level=log_level, access_log=log_level == "debug",
                                    timeout_graceful_shutdown=10)
            uvicorn.Server(config).run()
        finally:
            engine.dispose()
