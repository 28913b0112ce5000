"""The migrations produce exactly the models' schema; the named SQL parses and plans."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator.migrate import current_revision, head_revision, upgrade
from coordinator.models import Base
from coordinator.queries import Q, parse


def test_migrated_database_matches_models(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_drift_is_detected(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX candidates_unbatched"))
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert [d[0] for d in diff] == ["add_index"]


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() is not None


def test_every_named_statement_is_valid_sql(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            for name in Q.names():
                if name.startswith("ingest_"):  # psycopg templates, run by the ingest tests
                    continue
                sql = Q.sql(name)
                assert ":" in sql or "SELECT" in sql, name
                # PREPARE checks syntax and every name; parameters become untyped $n.
                statement = sa.text(sql).compile(dialect=engine.dialect)
                raw.execute(f"PREPARE p_{name} AS {_positional(str(statement))}")  # type: ignore[union-attr]
    finally:
        engine.dispose()


def _positional(compiled: str) -> str:
    import re

    names: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", repl, compiled)


def test_parse_splits_named_statements() -> None:
    src = "-- name: a\n-- a comment\nSELECT 1;\n\n-- name: b\nSELECT\n  2;\n"
    assert parse(src) == {"a": "SELECT 1", "b": "SELECT\n  2"}
