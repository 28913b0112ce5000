"""Remote workers hand shards over through S3-compatible storage (fsspec + s3fs).

A real S3 API server (moto's, on loopback) stands in for the farm's object store: a
`pairfarm worker` writes its shards to ``s3://shards/farm``; a `pairfarm postprocess`
node, told only the locations in the coordinator's lease, reads them from there. Neither
process shares a directory with the other.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from localfarm.demo import DEMO_MODEL, demo_threshold, write_candidates
from localfarm.demo_server import DemoPlan, DemoServer
from pairfarm.client import CoordinatorClient
from tests.conftest import REPO, RunningCoordinator, cli_env, run_cli
from tests.moto_s3 import moto_server

pytest.importorskip("s3fs", reason="S3 handover needs pairfarm[s3] (s3fs)")
pytest.importorskip("moto", reason="the loopback S3 server is moto[server] (dev extra)")

COUNT = 120


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with a bucket ``shards``."""
    with moto_server(tmp_path, "shards") as endpoint:
        yield endpoint


def s3_env(endpoint: str) -> dict[str, str]:
    return cli_env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="farm",
                   AWS_SECRET_ACCESS_KEY="farm", AWS_DEFAULT_REGION="us-east-1")


def s3_keys(endpoint: str) -> list[str]:
    body = httpx.get(f"{endpoint}/shards?list-type=2", timeout=10).text
    return [part.split("</Key>")[0] for part in body.split("<Key>")[1:]]


def test_worker_writes_to_s3_and_postprocess_reads_from_it(
        coordinator: RunningCoordinator, s3_endpoint: str, tmp_path: Path) -> None:
    server = DemoServer(DemoPlan(seed=5), hosts=2, delay=(0, 0.05)).start()
    local = Path(tempfile.mkdtemp(prefix="pairfarm-s3-"))
    try:
        candidates = write_candidates(server, COUNT, tmp_path / "candidates.parquet")
        run_cli("ingest", str(candidates), env=coordinator.env())
        env = s3_env(s3_endpoint)
        run_cli("worker", "--coordinator", coordinator.url, "--token",
                coordinator.token("worker"), "--output", "s3://shards/farm",
                "--allow-cidr", "127.0.0.0/8", "--exit-when-idle", "--no-progress",
                env=env, timeout=300)
        keys = s3_keys(s3_endpoint)
        assert "farm/00000001.tar" in keys and "farm/00000001_stats.json" in keys
        assert not (REPO / "shards").exists() and not (REPO / "farm").exists()

        t = demo_threshold()
        run_cli("postprocess", "--coordinator", coordinator.url, "--token",
                coordinator.token("gpu"), "--model", f"local-dir:{DEMO_MODEL}",
                "--device", "cpu", "--workers", "0", "--threshold", f"en={t}",
                "--no-nsfw", "--watermark", "off", "--out", str(local / "out"),
                "--workdir", str(local / "work"), "--exit-when-idle", env=env, timeout=300)
        with CoordinatorClient(coordinator.url, coordinator.token("admin")) as admin:
            stats = admin.stats()
        assert stats.batches.get("done", 0) == 1, stats.batches
        assert stats.kept + stats.dropped == stats.outcomes["ok"]
        assert stats.kept > 0 and stats.dropped > 0
    finally:
        server.stop()
        shutil.rmtree(local, ignore_errors=True)
