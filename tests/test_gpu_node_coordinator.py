"""End to end against the real coordinator (subprocess, real Postgres): candidates are
ingested, a batch is leased and completed as a download worker would (the shard built here
in pairfarm.shardformat's layout), then ``pairfarm postprocess`` leases it as a GPU node,
filters it with the tiny CLIP and completes it; the coordinator's stats show the counts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from pairfarm.client import CoordinatorClient
from pairfarm.protocol import BatchStatus, DownloadReport
from tests.conftest import RunningCoordinator, run_cli, start_coordinator
from tests.gpu_shards import Row, write_shard
from tests.gpu_tiny import TINY_MODEL, evaluation_rows, gap
from tests.leasing import engine_for

PAIRS = 20


def _ingest(coordinator: RunningCoordinator, tmp_path: Path) -> dict[str, tuple[Row, bool]]:
    rows, match = evaluation_rows(languages=("en", "de"))
    by_url = {f"http://127.0.0.1/pic/{i}.jpg": (row, m)
              for i, (row, m) in enumerate(zip(rows[:PAIRS], match[:PAIRS], strict=True))}
    path = tmp_path / "candidates.parquet"
    pq.write_table(pa.table({"url": list(by_url), "caption": [r.caption for r, _ in
                                                               by_url.values()],
                             "language": [r.language for r, _ in by_url.values()]}), path)
    run_cli("ingest", str(path), "--language-col", "language", env=coordinator.env())
    return by_url


def _download_as_a_worker(url: str, token: str, by_url: dict[str, tuple[Row, bool]],
                          folder: Path) -> tuple[int, list[bool]]:
    with CoordinatorClient(url, token) as client:
        client.register("test-worker")
        lease = client.lease_download()
        assert lease is not None and len(lease.candidates) == PAIRS
        rows = [by_url[c.url][0] for c in lease.candidates]
        files = write_shard(folder, lease.batch_id, rows)
        state = client.complete("download", lease.batch_id, DownloadReport(
            lease_token=lease.lease_token, shard=files, outcomes={"ok": PAIRS},
            bytes_downloaded=files.tar_bytes, duration_s=1.0))
        assert state.status == BatchStatus.DOWNLOADED
    return lease.batch_id, [by_url[c.url][1] for c in lease.candidates]


def test_postprocess_node_against_the_real_coordinator(db_url: str, tmp_path: Path) -> None:
    coordinator = start_coordinator(db_url, tmp_path / "coordinator.log", "--batch-size",
                                    str(PAIRS))
    try:
        by_url = _ingest(coordinator, tmp_path)
        batch_id, match = _download_as_a_worker(coordinator.url, coordinator.token("worker"),
                                                by_url, tmp_path / "shards")
        gpu_token = coordinator.token("gpu")
        out = tmp_path / "out"
        proc = _postprocess(coordinator.url, gpu_token, out, tmp_path / "work")
        done = json.loads(proc.stdout.strip().splitlines()[-1])
        assert done == {"batch_id": batch_id, "kept": sum(match),
                        "dropped": PAIRS - sum(match)}
        with CoordinatorClient(coordinator.url, gpu_token) as client:
            stats = client.stats()
            assert client.lease_postprocess() is None  # nothing left: the batch is done
        assert stats.kept == sum(match) and stats.dropped == PAIRS - sum(match)
        assert stats.batches.get(BatchStatus.DONE.value) == 1
        kept = pq.read_table(out / f"{batch_id:08d}.parquet").to_pylist()
        assert [r["keep"] for r in kept] == match
        assert {r["language"] for r in kept} == {"en", "de"}
    finally:
        coordinator.stop()


def _postprocess(url: str, token: str, out: Path, work: Path, *extra: str,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    t = gap()["threshold"]
    return run_cli("postprocess", "--coordinator", url, "--token", token,
                   "--model", TINY_MODEL, "--device", "cpu", "--workers", "1",
                   "--threshold", f"en={t}", "--threshold", f"*={t}",
                   "--watermark", "off", "--out", str(out), "--workdir", str(work),
                   "--exit-when-idle", *extra, timeout=300, check=check)


def _batch(db_url: str, batch_id: int) -> sa.Row[Any]:
    with engine_for(db_url) as engine, engine.connect() as conn:
        return conn.execute(sa.text("SELECT status, pp_attempts, last_error FROM batches "
                                    "WHERE id = :id"), {"id": batch_id}).one()


def test_a_node_whose_output_is_a_file_spends_no_attempt_and_stops(
        db_url: str, tmp_path: Path) -> None:
    """--max-attempts 1 and an output folder the node cannot write into (its
    ``embeddings`` is a file): the node fails the shard twice on its own machine (cause
    worker), then exits 1 with one line; the batch is back in ``downloaded`` with no
    post-processing attempt spent, and once the output is fixed a node completes it."""
    coordinator = start_coordinator(db_url, tmp_path / "coordinator.log", "--batch-size",
                                    str(PAIRS), "--max-attempts", "1")
    try:
        by_url = _ingest(coordinator, tmp_path)
        batch_id, match = _download_as_a_worker(coordinator.url, coordinator.token("worker"),
                                                by_url, tmp_path / "shards")
        gpu_token = coordinator.token("gpu")
        out = tmp_path / "out"
        afile = out / "embeddings"
        out.mkdir()
        afile.write_text("not a folder")
        proc = _postprocess(coordinator.url, gpu_token, out, tmp_path / "work",
                            "--stop-after-failures", "2", check=False)
        assert proc.returncode == 1, proc.stderr
        assert "NodeStopped: stopping: 2 batches in a row failed on this machine" in proc.stderr
        assert str(afile) in proc.stderr and "Traceback" not in proc.stderr
        row = _batch(db_url, batch_id)
        assert (row.status, row.pp_attempts) == (BatchStatus.DOWNLOADED.value, 0)
        assert row.last_error.startswith("postprocess failed on the worker (no attempt spent)")
        afile.unlink()
        proc = _postprocess(coordinator.url, gpu_token, out, tmp_path / "work")
        done = json.loads(proc.stdout.strip().splitlines()[-1])
        assert done == {"batch_id": batch_id, "kept": sum(match),
                        "dropped": PAIRS - sum(match)}
        row = _batch(db_url, batch_id)
        assert (row.status, row.pp_attempts) == (BatchStatus.DONE.value, 1)
    finally:
        coordinator.stop()
