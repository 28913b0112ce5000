"""``pairfarm coordinator --processes 2``: two server processes on one port and one real
PostgreSQL, leased from by many client threads at once; the reaper of both processes;
``/metrics`` summing both processes' counters."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from coordinator.tokens import create_token
from pairfarm.client import CoordinatorClient
from pairfarm.protocol import DownloadReport, ShardFiles
from tests.conftest import RunningCoordinator, insert_candidates, start_coordinator

CANDIDATES = 4_000
BATCH = 50
THREADS = 16
SHA = "0" * 64


def tokens(engine: sa.Engine, count: int) -> list[str]:
    return [create_token(engine, "worker", f"vm-{i}")[1] for i in range(count)]


def report(lease_token: str, size: int, batch_id: int) -> DownloadReport:
    stem = f"s3://farm/{batch_id:08d}"
    shard = ShardFiles(tar=f"{stem}.tar", parquet=f"{stem}.parquet",
                       stats=f"{stem}_stats.json", tar_sha256=SHA, parquet_sha256=SHA,
                       tar_bytes=0)
    return DownloadReport(lease_token=lease_token, shard=shard, outcomes={"ok": size},
                          bytes_downloaded=0, duration_s=0.1)


def lease_until_empty(base: str, token: str, start: threading.Barrier) -> list[list[int]]:
    """Lease and complete batches until the coordinator answers 204; the candidate ids of
    each batch."""
    batches: list[list[int]] = []
    with CoordinatorClient(base, token) as client:
        client.register(f"thread-{threading.get_ident()}")
        start.wait()
        while (lease := client.lease_download()) is not None:
            batches.append([c.id for c in lease.candidates])
            client.complete("download", lease.batch_id,
                            report(lease.lease_token, len(lease.candidates), lease.batch_id))
    return batches


def server_processes(running: RunningCoordinator) -> list[psutil.Process]:
    return [p for p in psutil.Process(running.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline())]


def counter(body: str, name: str, kind: str = "download") -> float:
    found = re.search(rf'^{name}{{kind="{kind}"}} (\S+)$', body, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def _coordinator_connections(engine: sa.Engine, want: int, timeout: float = 30.0) -> list[str]:
    """The coordinator processes' connection names, once ``want`` show (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            names = list(conn.execute(sa.text(
                "SELECT DISTINCT application_name FROM pg_stat_activity "
                "WHERE application_name LIKE 'pairfarm coordinator %'")).scalars())
        if len(names) >= want or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def test_two_processes_lease_every_candidate_once(db_url: str, engine: sa.Engine,
                                                  tmp_path: Path) -> None:
    insert_candidates(db_url, CANDIDATES)
    # --reap-interval 0.5: each process's reaper connects twice a second, so both show in
    # pg_stat_activity whichever process the kernel hands the leases' connections to
    running = start_coordinator(db_url, tmp_path / "coordinator.log", "--processes", "2",
                                "--batch-size", str(BATCH), "--reap-interval", "0.5")
    try:
        assert len(server_processes(running)) == 2
        start = threading.Barrier(THREADS)
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(lambda t: lease_until_empty(running.url, t, start),
                                    tokens(engine, THREADS)))
        leased = [i for thread in results for batch in thread for i in batch]
        batches = sum(len(thread) for thread in results)
        assert len(leased) == len(set(leased)), "a candidate was leased twice"
        assert sorted(leased) == list(range(1, CANDIDATES + 1))
        with engine.connect() as conn:
            members = conn.execute(sa.text(
                "SELECT id, count(*) FROM (SELECT unnest(ids) AS id FROM batch_members) s "
                "GROUP BY id HAVING count(*) > 1")).all()
            pending = conn.execute(sa.text("SELECT count(*) FROM pending_chunks")).scalar()
            states = dict(conn.execute(sa.text(
                "SELECT status, count(*) FROM batches GROUP BY status")).all())
        names = _coordinator_connections(engine, want=2)
        assert members == [] and pending == 0
        assert states == {"downloaded": batches}
        assert len(names) == 2, f"connections of both server processes expected: {names}"
        for _ in range(4):  # whichever process answers, the counters are both processes'
            body = httpx.get(f"{running.url}/metrics").text
            assert counter(body, "pairfarm_leases_total") == batches
            assert counter(body, "pairfarm_completions_total") == batches
            assert "process_resident_memory_bytes" not in body
            assert f'pairfarm_batches{{state="downloaded"}} {batches}.0' in body
    finally:
        running.stop()
    assert running.proc.returncode == 0, (tmp_path / "coordinator.log").read_text()


def test_two_processes_reap_each_expired_lease_once(db_url: str, engine: sa.Engine,
                                                   tmp_path: Path) -> None:
    insert_candidates(db_url, 10 * BATCH)
    # the TTL outlasts the ten leases even on a loaded machine (at 1 s a lease could
    # expire and be re-leased by the next client before all ten were out)
    running = start_coordinator(db_url, tmp_path / "coordinator.log", "--processes", "2",
                                "--batch-size", str(BATCH), "--lease-ttl", "5",
                                "--reap-interval", "0.2")
    try:
        first: list[int] = []
        for token in tokens(engine, 10):  # leased and abandoned: no heartbeat
            with CoordinatorClient(running.url, token) as client:
                lease = client.lease_download()
                assert lease is not None
                first.append(lease.batch_id)
        assert len(set(first)) == 10, f"a lease expired while leasing: {first}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT id, status, attempts, last_error, worker_id FROM batches "
                    "ORDER BY id")).all()
            if all(r.status == "pending" for r in rows):
                break
            time.sleep(0.2)
        assert [r.id for r in rows] == sorted(first)
        assert all(r.status == "pending" and r.attempts == 1 and r.worker_id is None
                   for r in rows), rows
        assert {r.last_error for r in rows} == {"download lease expired (attempt 1 of 3)"}
        for _ in range(4):
            body = httpx.get(f"{running.url}/metrics").text
            assert counter(body, "pairfarm_lease_expiries_total") == 10
        [again] = tokens(engine, 1)
        with CoordinatorClient(running.url, again) as client:
            relet = [client.lease_download() for _ in range(10)]
        relet_ids = {r.batch_id for r in relet if r is not None}
        assert relet_ids and relet_ids <= set(first)  # the same batches, no new one
    finally:
        running.stop()
    assert running.proc.returncode == 0, (tmp_path / "coordinator.log").read_text()


def test_a_reaper_pass_waits_its_turn_while_another_holds_the_lock(db_url: str,
                                                                   engine: sa.Engine) -> None:
    """The advisory lock of ``reap_lock``: while another process's pass holds it, a pass
    reaps nothing; the next pass after it is released reaps the lease."""
    from coordinator.queries import Q
    from tests.leasing import expire, leases, new_worker

    insert_candidates(db_url, BATCH)
    service = leases(engine, batch_size=BATCH)
    lease = service.lease_download(new_worker(engine, "vm-1"))
    assert lease is not None
    expire(engine, lease.batch_id)
    with engine.connect() as other:
        assert other.execute(Q.reap_lock).scalar_one() is True
        assert service.reap() == []
        other.rollback()  # the other pass ends
    assert service.reap() == [(lease.batch_id, "pending")]
