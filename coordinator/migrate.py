"""Schema migrations (Alembic, scripts in ``migrations/``), run from code.

Resource handling: ``upgrade`` opens one connection and closes it; the migration runs
under a transaction-level advisory lock so that two coordinators starting together do not
race. Error handling: driver errors become ``DatabaseUnavailable``.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from coordinator.errors import DatabaseUnavailable

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
LOCK_KEY = 0x70616972  # "pair"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``."""
    config = alembic_config(url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot migrate {_safe(url)}: {exc.orig}") from exc
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()


def _safe(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)
