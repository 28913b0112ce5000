"""One local command: ``pairfarm coordinator`` without DATABASE_URL runs an embedded
PostgreSQL in --data-dir, shares it with the other commands, and stops it on exit."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.embedded_pg import read_running
from pairfarm.client import CoordinatorClient
from tests.conftest import cli_env, run_cli, start_coordinator


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Outside pytest's basetemp: see the pg_server fixture for why.
    root = Path(tempfile.mkdtemp(prefix="pairfarm-farm-"))
    try:
        yield root / "pg"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_embedded_farm_round_trip(data_dir: Path, tmp_path: Path) -> None:
    env = cli_env(PAIRFARM_DATA_DIR=str(data_dir))
    env.pop("DATABASE_URL", None)
    source = tmp_path / "in.csv"
    source.write_text("url,caption\nhttp://a.test/1.jpg,a red bicycle\n"
                      "http://b.test/2.jpg,two cats on a sofa\n")
    out = run_cli("ingest", str(source), env=env).stdout
    assert "inserted 2" in out
    assert read_running(data_dir) is None, "a command stops the server it started"
    coord = start_coordinator("", tmp_path / "coordinator.log", env=env)
    try:
        token = run_cli("token", "create", "--role", "worker", env=env).stdout.strip()
        assert read_running(data_dir) is not None, "token create reused the running server"
        with CoordinatorClient(coord.url, token) as client:
            lease = client.lease_download()
        assert lease is not None
        assert sorted(c.url for c in lease.candidates) == ["http://a.test/1.jpg",
                                                            "http://b.test/2.jpg"]
    finally:
        coord.stop()
    assert coord.proc.returncode == 0
    assert read_running(data_dir) is None, "the coordinator stopped its PostgreSQL"
