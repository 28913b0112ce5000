"""``pairfarm batches list|requeue`` on a real Postgres, run as a user runs them.

The farm's state is made with ``Leases`` (what the API does); the commands run in a
subprocess with ``DATABASE_URL``. After a requeue the batches are leased again and every
candidate is checked to be in exactly one batch, never back in ``pending_chunks``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import sqlalchemy as sa

from coordinator.errors import LeaseConflict
from coordinator.leases import Leases
from pairfarm.protocol import BatchStatus, DownloadLease, FailReport
from tests.conftest import cli_env, insert_candidates, run_cli
from tests.leasing import engine_for, expire, leases, new_worker, pending_ids, report


def _batches(db_url: str, *args: str, check: bool = True) -> str:
    proc = run_cli("batches", *args, env=cli_env(DATABASE_URL=db_url), check=check)
    return proc.stdout + proc.stderr


def _state(engine: sa.Engine, batch_id: int) -> tuple[str, int]:
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status, attempts FROM batches WHERE id = :id"),
                           {"id": batch_id}).one()
    return row.status, row.attempts


def _lease(service: Leases, worker: int) -> DownloadLease:
    lease = service.lease_download(worker)
    assert lease is not None
    return lease


def _fail(service: Leases, worker: int, reason: str) -> DownloadLease:
    lease = _lease(service, worker)
    service.fail("download", lease.batch_id, worker,
                 FailReport(lease_token=lease.lease_token, reason=reason))
    return lease


def _assert_each_candidate_in_one_batch(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        members = Counter(conn.execute(sa.text(
            "SELECT unnest(ids) FROM batch_members")).scalars())
        every = set(conn.execute(sa.text("SELECT id FROM candidates")).scalars())
    assert set(members) == every and set(members.values()) == {1}
    assert pending_ids(engine) == []


def test_requeue_gives_failed_batches_back_by_reason_and_worker(db_url: str) -> None:
    """Batch 1 failed on a broken worker ("File exists"), batch 2 on another with another
    reason, batch 3 was downloaded; max_attempts 1, so each failure was final."""
    insert_candidates(db_url, 30)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, max_attempts=1)
        broken, healthy = new_worker(engine, "vm-broken"), new_worker(engine, "vm-ok")
        first = _fail(service, broken, "shard write failed: create output directory: "
                                       "[Errno 17] File exists: 'afile'")
        second = _fail(service, healthy, "report rejected: outcome counts sum to 9")
        third = _lease(service, healthy)
        service.complete_download(third.batch_id, healthy, report(third.lease_token, 10))
        assert _state(engine, first.batch_id) == ("failed", 1)

        listed = _batches(db_url, "list")
        assert "2 batches (20 candidates)" in listed and "vm-broken" in listed
        assert _batches(db_url, "requeue", "--reason", "file EXISTS", "--dry-run") \
            .strip() == "would requeue 1 batches (10 candidates)"
        assert _state(engine, first.batch_id) == ("failed", 1)
        assert _batches(db_url, "requeue", "--reason", "file exists").strip() \
            == "requeued 1 batches (10 candidates)"
        assert _state(engine, first.batch_id) == ("pending", 0)
        assert _state(engine, second.batch_id) == ("failed", 1)
        assert _batches(db_url, "requeue", "--worker", "vm-ok").strip() \
            == "requeued 1 batches (10 candidates)"  # batch 3 is downloaded: untouched
        assert _state(engine, third.batch_id) == ("downloaded", 1)

        for before in (first, second):
            again = _lease(service, healthy)
            assert (again.batch_id, again.candidates) == (before.batch_id, before.candidates)
            service.complete_download(again.batch_id, healthy, report(again.lease_token, 10))
        assert service.lease_download(healthy) is None
        _assert_each_candidate_in_one_batch(engine)


def test_requeue_by_id_takes_a_held_batch_and_fences_its_holder(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        gone, other = new_worker(engine, "vm-gone"), new_worker(engine, "vm-other")
        held, kept = _lease(service, gone), _lease(service, other)
        out = _batches(db_url, "requeue", "--state", "leased", "--id", str(held.batch_id))
        assert out.strip() == "requeued 1 batches (10 candidates)"
        assert _state(engine, held.batch_id) == ("pending", 0)
        assert _state(engine, kept.batch_id) == ("leased", 1)
        with pytest.raises(LeaseConflict):
            service.complete_download(held.batch_id, gone, report(held.lease_token, 10))
        listed = _batches(db_url, "list", "--state", "pending", "--worker", "vm-gone")
        assert "1 batches (10 candidates)" in listed  # the last holder is remembered
        again = _lease(service, other)
        assert (again.batch_id, again.candidates) == (held.batch_id, held.candidates)
        _assert_each_candidate_in_one_batch(engine)


def test_the_reaper_remembers_the_last_holder(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, max_attempts=1)
        lease = _lease(service, new_worker(engine, "vm-silent"))
        expire(engine, lease.batch_id)
        assert service.reap() == [(lease.batch_id, BatchStatus.FAILED.value)]
        listed = _batches(db_url, "list", "--worker", "vm-silent", "--reason", "expired")
        assert "1 batches (10 candidates)" in listed and "vm-silent" in listed


def test_requeue_refuses_states_that_are_not_stuck(db_url: str) -> None:
    proc = run_cli("batches", "requeue", "--state", "done", env=cli_env(DATABASE_URL=db_url),
                   check=False)
    assert proc.returncode == 1
    assert "batches in ['done'] cannot be requeued" in proc.stderr
