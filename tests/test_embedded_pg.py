from pathlib import Path

import psycopg
import pytest

from coordinator.embedded_pg import EmbeddedPostgres, read_running


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
