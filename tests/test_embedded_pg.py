from pathlib import Path

import psycopg
import pytest

from coordinator.embedded_pg import (
    MIB,
    EmbeddedPostgres,
    ServerSettings,
    machine_memory,
    read_running,
)

GIB = 1024 * MIB


def test_start_reuse_stop(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data")
    first = pg.start()
    try:
        assert pg.start() == first, "a running server on the same data directory is reused"
        with psycopg.connect(first.url().replace("+psycopg", "")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        pg.stop()
    assert read_running(tmp_path / "data") is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(first.url().replace("+psycopg", ""), connect_timeout=2)


def test_session_server_is_tuned_for_tests(pg_server) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(pg_server.url().replace("+psycopg", "")) as conn:
        assert conn.execute("show fsync").fetchone() == ("off",)


def test_server_settings_scale_with_memory() -> None:
    assert ServerSettings.for_memory(24 * GIB).shared_buffers_mb == 6144
    assert ServerSettings.for_memory(256 * GIB).shared_buffers_mb == 8192
    assert ServerSettings.for_memory(256 * MIB).shared_buffers_mb == 128


def test_started_server_has_farm_settings(tmp_path: Path) -> None:
    """A farm's embedded server: WAL room for bulk ingest, buffers from RAM, still durable."""
    pg = EmbeddedPostgres(tmp_path / "data")
    server = pg.start()
    try:
        with psycopg.connect(server.url().replace("+psycopg", "")) as conn:
            def show(name: str) -> str:
                row = conn.execute(f"show {name}").fetchone()
                assert row is not None
                return str(row[0])

            assert show("max_wal_size") == "8GB"
            assert show("checkpoint_timeout") == "15min"
            assert show("fsync") == "on"
            assert show("full_page_writes") == "on"
            assert show("synchronous_commit") == "on"
            row = conn.execute(
                "select pg_size_bytes(current_setting('shared_buffers'))").fetchone()
            expected = ServerSettings.for_memory(machine_memory()).shared_buffers_mb
            assert row == (expected * MIB,)
    finally:
        pg.stop()


def test_given_settings_override_farm_settings(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data", settings={"max_wal_size": "2GB"})
    server = pg.start()
    try:
        with psycopg.connect(server.url().replace("+psycopg", "")) as conn:
            assert conn.execute("show max_wal_size").fetchone() == ("2GB",)
            assert conn.execute("show checkpoint_timeout").fetchone() == ("15min",)
    finally:
        pg.stop()
