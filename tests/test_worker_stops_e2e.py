"""End to end: ``pairfarm worker`` in a subprocess against a real coordinator, stopping
for reasons of its own: a token revoked mid-batch, an output path that is a file.

The image server holds every answer until the test ends, so the batch is in flight,
whatever the machine's speed, when the token is revoked; the coordinator's 3 s lease TTL
makes the worker beat every second.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trio

from pairfarm.client import CoordinatorClient
from tests import hostile_server as hs
from tests.conftest import REPO, RunningCoordinator, cli_env, run_cli, start_coordinator

COUNT = 8


class HeldImages:
    """Answers no request until the test ends; ``arrived`` is set by the first one."""

    def __init__(self) -> None:
        self.arrived = threading.Event()

    async def handler(self, stream: trio.SocketStream, request: hs.Request) -> None:
        self.arrived.set()
        await trio.sleep_forever()


@pytest.fixture
def held() -> Iterator[tuple[HeldImages, hs.HostileServer]]:
    images = HeldImages()
    with hs.server_thread({}, "127.0.0.1", images.handler) as server:
        yield images, server


@pytest.fixture
def farm(db_url: str, tmp_path: Path,
         held: tuple[HeldImages, hs.HostileServer]) -> Iterator[RunningCoordinator]:
    urls = [f"http://127.0.0.1:{held[1].port}/img/{n}.jpg" for n in range(COUNT)]
    listing = tmp_path / "candidates.parquet"
    captions = [f"a picture, number {n}" for n in range(COUNT)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), listing)
    run_cli("ingest", str(listing), env=cli_env(DATABASE_URL=db_url))
    coord = start_coordinator(db_url, tmp_path / "coordinator.log", "--batch-size", "4",
                              "--lease-ttl", "3", "--reap-interval", "1")
    try:
        yield coord
    finally:
        coord.stop()


def _worker(coord: RunningCoordinator, token: str, out: Path,
            log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "pairfarm", "-v", "worker", "--coordinator", coord.url,
            "--token", token, "-o", str(out), "--allow-cidr", "127.0.0.0/8", "--no-progress",
            "--read-timeout", "600", "--deadline", "600", "--decode-threads", "1"]
    with log.open("wb") as sink:
        return subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=sink,
                                stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen[bytes], log: Path) -> tuple[int, str]:
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the worker did not stop:\n{log.read_text()}") from None
    return code, log.read_text(errors="replace")


def test_a_token_revoked_mid_batch_ends_the_worker_in_one_line(
        farm: RunningCoordinator, held: tuple[HeldImages, hs.HostileServer],
        tmp_path: Path) -> None:
    out, log = tmp_path / "shards", tmp_path / "worker.log"
    proc = _worker(farm, farm.token("worker", "vm-1"), out, log)
    try:
        assert held[0].arrived.wait(60), log.read_text()  # the batch is in flight
        run_cli("token", "revoke", "vm-1", env=farm.env())
        code, text = _wait(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1, text
    assert "Traceback" not in text and "ExceptionGroup" not in text, text
    assert "the coordinator refused this worker's token (revoked?): stopping" in text
    assert [p.name for p in out.rglob("*")] == []  # no .tmp tar, no shard


def test_an_output_path_that_is_a_file_stops_the_worker_before_any_lease(
        farm: RunningCoordinator, tmp_path: Path) -> None:
    afile, log = tmp_path / "afile", tmp_path / "worker.log"
    afile.touch()
    code, text = _wait(_worker(farm, farm.token("worker", "vm-2"), afile, log), log)
    assert code == 1 and "Traceback" not in text, text
    assert f"cannot write shards to {afile}" in text and "File exists" in text
    with CoordinatorClient(farm.url) as client:
        stats = client.stats()
    assert stats.candidates_total == stats.candidates_unbatched == COUNT  # no batch formed
    assert not any(stats.batches.values())
