"""Helpers for the lease tests: an engine, lease services, workers and reports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from coordinator.leases import Leases
from coordinator.settings import make_lease_settings
from coordinator.tokens import authenticate, create_token, touch_worker
from pairfarm.protocol import DownloadReport, ShardFiles

SHA = "0" * 64


@contextmanager
def engine_for(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url, pool_size=20, max_overflow=5)
    try:
        yield engine
    finally:
        engine.dispose()


def leases(engine: sa.Engine, batch_size: int = 100, **kw: float) -> Leases:
    return Leases(engine, make_lease_settings(batch_size=batch_size, **kw))  # type: ignore[arg-type]


def new_worker(engine: sa.Engine, name: str, role: str = "worker") -> int:
    _, token = create_token(engine, role, name)
    return touch_worker(engine, authenticate(engine, token))


def report(lease_token: str, size: int, ok: int | None = None) -> DownloadReport:
    ok = size if ok is None else ok
    outcomes = {"ok": ok, "timeout": size - ok} if ok < size else {"ok": ok}
    shard = ShardFiles(tar="s/00000001.tar", parquet="s/00000001.parquet",
                       stats="s/00000001_stats.json", tar_sha256=SHA, parquet_sha256=SHA,
                       tar_bytes=123)
    return DownloadReport(lease_token=lease_token, shard=shard, outcomes=outcomes,
                          bytes_downloaded=1000, duration_s=1.5)


def expire(engine: sa.Engine, batch_id: int) -> None:
    """Move a lease's expiry into the past: what the passing of its TTL does."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE batches SET lease_expires_at = now() - interval '1 s' "
                             "WHERE id = :id"), {"id": batch_id})


def mark_batched(engine: sa.Engine, where: str) -> None:
    """Put the pending candidates matching ``where`` (a condition on ``id``) into one
    finished batch (a drained farm)."""
    with engine.begin() as conn:
        batch = conn.execute(sa.text(
            "INSERT INTO batches (status, size) VALUES ('done', 0) RETURNING id")).scalar_one()
        conn.execute(sa.text(
            f"WITH taken AS (DELETE FROM pending_candidates WHERE {where} RETURNING id) "
            "INSERT INTO batch_members (batch_id, ids) "
            "SELECT :b, array_agg(id) FROM taken HAVING count(*) > 0"), {"b": batch})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE pending_candidates"))
