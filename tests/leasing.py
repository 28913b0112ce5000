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
    """A lease service; every lease looks at the queue (``empty_hold_s`` 0) unless the
    test is about the empty-queue hold."""
    settings = make_lease_settings(batch_size=batch_size,  # type: ignore[arg-type]
                                   **{"empty_hold_s": 0.0, **kw})
    return Leases(engine, settings)


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
    finished batch (a drained farm); the others stay in their chunks."""
    with engine.begin() as conn:
        batch = conn.execute(sa.text(
            "INSERT INTO batches (status, size) VALUES ('done', 0) RETURNING id")).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO batch_members (batch_id, ids) SELECT :b, array_agg(id) "
            f"FROM (SELECT unnest(ids) AS id FROM pending_chunks) AS s WHERE {where} "
            "HAVING count(*) > 0"), {"b": batch})
        conn.execute(sa.text(  # a chunk whose ids change loses its fragments
            "UPDATE pending_chunks SET url_j = NULL, caption_j = NULL, language_j = NULL, "
            "extra_j = NULL, ids = "
            f"ARRAY(SELECT id FROM unnest(ids) AS u(id) WHERE NOT ({where})) "
            f"WHERE EXISTS (SELECT FROM unnest(ids) AS u(id) WHERE {where})"))
        conn.execute(sa.text("DELETE FROM pending_chunks WHERE cardinality(ids) = 0"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE pending_chunks"))


def pending_ids(engine: sa.Engine) -> list[int]:
    """Every candidate id in ``pending_chunks``, repeats included, in id order."""
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT id FROM (SELECT unnest(ids) AS id FROM pending_chunks) AS s ORDER BY id"
        )).scalars())
