"""The farm's figures for ``GET /stats``: a handful of aggregate queries over ``batches``
(one row per batch, so at most ~10^5 rows for 10^9 candidates) and ``ingests``; nothing
scans the candidates table."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from coordinator.queries import Q
from pairfarm.protocol import BatchStatus, FarmStats, Role, WorkerStatus

NOT_DOWNLOADED = (BatchStatus.PENDING.value, BatchStatus.LEASED.value)


def farm_stats(engine: sa.Engine, alive_window_s: float) -> FarmStats:
    with engine.connect() as conn:
        by_status = list(conn.execute(Q.stats_batches))
        totals = conn.execute(Q.stats_totals).one()
        outcomes = {r.outcome: int(r.total) for r in conn.execute(Q.stats_outcomes)}
        total = int(conn.execute(Q.stats_ingested).scalar_one())
        workers = [_worker(r) for r in conn.execute(Q.stats_workers,
                                                     {"window": alive_window_s})]
    batched = {r.status: int(r.candidates) for r in by_status}
    unbatched = max(0, total - sum(batched.values()))
    waiting = unbatched + sum(batched.get(s, 0) for s in NOT_DOWNLOADED)
    return FarmStats(
        candidates_total=total, candidates_pending=waiting, candidates_unbatched=unbatched,
        candidates_by_status={"unbatched": unbatched, **batched},
        batches={s.value: 0 for s in BatchStatus} | {r.status: int(r.batches)
                                                     for r in by_status},
        outcomes=outcomes, bytes_downloaded=int(totals.bytes_downloaded),
        kept=int(totals.kept), dropped=int(totals.dropped), workers_alive=len(workers),
        workers=workers)


def _worker(row: sa.Row[Any]) -> WorkerStatus:
    return WorkerStatus(id=row.id, name=row.name, role=Role(row.role), version=row.version,
                        last_seen_at=row.last_seen_at, batches=list(row.batches))
