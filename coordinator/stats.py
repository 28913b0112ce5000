"""The farm's figures for ``GET /stats``, the dashboard and ``/metrics``: a handful of
aggregate queries over ``batches`` (one row per batch, so at most ~10^5 rows for 10^9
candidates), ``workers`` and ``ingests``; nothing scans the candidates table.

URL retries: a candidate sent back for a retry leaves its batch's size and outcome
counts (``batches.retried`` counts it), so ``outcomes`` count each URL once, by its final
outcome, and a candidate waiting for its retry, in no batch, is one of the unbatched
(pending) ones; ``candidates_retry_waiting`` counts those, ``retried`` the attempts sent
back."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from coordinator.queries import Q
from pairfarm.protocol import (
    BatchStatus,
    FarmStats,
    Role,
    SimilarityHistogram,
    ThroughputPoint,
    WorkerStatus,
)

NOT_DOWNLOADED = (BatchStatus.PENDING.value, BatchStatus.LEASED.value)
#: batches that reached post-processing or wait for it
POSTPROCESS_STAGE = (BatchStatus.DOWNLOADED.value, BatchStatus.POSTPROCESSING.value,
                     BatchStatus.DONE.value)
RATE_WINDOW_S = 600.0
THROUGHPUT_MINUTES = 60


@dataclass(frozen=True)
class _Downloads:
    """Candidates one download worker completed: in all, and within the rate window."""

    total: int
    recent: int


def farm_stats(engine: sa.Engine, alive_window_s: float) -> FarmStats:
    window = {"rate_window": RATE_WINDOW_S}
    with engine.connect() as conn:
        by_status = list(conn.execute(Q.stats_batches))
        totals = conn.execute(Q.stats_totals).one()
        outcomes = {r.outcome: int(r.total) for r in conn.execute(Q.stats_outcomes)}
        total = int(conn.execute(Q.stats_ingested).scalar_one())
        retries = conn.execute(Q.stats_retries).one()
        rate = conn.execute(Q.stats_rate, window).one()
        downloads = {r.worker_id: _Downloads(int(r.total), int(r.recent))
                     for r in conn.execute(Q.stats_worker_downloads, window)}
        workers = [_worker(r, downloads) for r in conn.execute(
            Q.stats_workers, {"window": alive_window_s, **window})]
        throughput = [ThroughputPoint(start=r.start, candidates=int(r.candidates), ok=int(r.ok))
                      for r in conn.execute(Q.stats_throughput,
                                            {"minutes": THROUGHPUT_MINUTES})]
        similarity = _similarity(list(conn.execute(Q.stats_similarity)))
    batched = {r.status: int(r.candidates) for r in by_status}
    batches = {s.value: 0 for s in BatchStatus} | {r.status: int(r.batches) for r in by_status}
    unbatched = max(0, total - sum(batched.values()))
    waiting = unbatched + sum(batched.get(s, 0) for s in NOT_DOWNLOADED)
    per_s = int(rate.recent) / float(rate.span_s)
    kept, dropped = int(totals.kept), int(totals.dropped)
    return FarmStats(
        candidates_total=total, candidates_pending=waiting, candidates_unbatched=unbatched,
        candidates_by_status={"unbatched": unbatched, **batched}, batches=batches,
        outcomes=outcomes, bytes_downloaded=int(totals.bytes_downloaded),
        kept=kept, dropped=dropped, workers_alive=len(workers), workers=workers,
        generated_at=rate.now, progress_pct=_percent(total - waiting, total),
        rate_window_s=RATE_WINDOW_S, download_rate_per_s=per_s,
        eta_s=waiting / per_s if per_s > 0 else None, throughput=throughput,
        postprocess_batches_done=batches[BatchStatus.DONE.value],
        postprocess_batches_total=sum(batches[s] for s in POSTPROCESS_STAGE),
        kept_ratio=kept / (kept + dropped) if kept + dropped else None,
        similarity=similarity, retried=int(retries.retried),
        candidates_retry_waiting=int(retries.waiting))


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _worker(row: sa.Row[Any], downloads: dict[int, _Downloads]) -> WorkerStatus:
    role = Role(row.role)
    done = downloads.get(row.id, _Downloads(0, 0))
    rate = done.recent / float(row.span_s) if role is Role.WORKER else None
    return WorkerStatus(id=row.id, name=row.name, role=role, version=row.version,
                        last_seen_at=row.last_seen_at, batches=list(row.batches),
                        last_seen_s=max(0.0, float(row.last_seen_s)), rate_per_s=rate,
                        downloaded=done.total, quarantined_until=row.quarantined_until,
                        quarantine_reason=row.quarantine_reason)


def _similarity(rows: list[sa.Row[Any]]) -> SimilarityHistogram:
    """The summed histogram of the edge set that counts the most samples (reports of one
    farm share their edges; a report with other edges cannot be added bin by bin)."""
    by_edges: dict[str, tuple[list[float], dict[int, int]]] = {}
    totals: dict[str, int] = defaultdict(int)
    for r in rows:
        key = repr(r.edges)
        edges, bins = by_edges.setdefault(key, ([float(e) for e in r.edges], {}))
        bins[int(r.bin) - 1] = int(r.samples)
        totals[key] += int(r.samples)
    if not by_edges:
        return SimilarityHistogram()
    edges, bins = by_edges[max(totals, key=lambda k: totals[k])]
    return SimilarityHistogram(edges=edges, counts=[bins.get(i, 0) for i in range(len(edges) - 1)])
