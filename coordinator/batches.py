"""Operator actions on batches: list them and give failed ones back to the queue
(``pairfarm batches list|requeue``).

A batch keeps its candidates (``batch_members``) whatever its state, so requeueing moves
no candidate: each stays in exactly one batch, and ends in that batch's one outcome. A
batch without a shard goes back to ``pending`` with its download attempts reset; one with
a shard (it failed in post-processing) back to ``downloaded`` with its post-processing
attempts reset. Requeueing a held batch (``leased``, ``postprocessing``) clears its lease
token, so its holder is fenced out (409) like after an expiry.

Error handling: ``SettingsError`` for a state that cannot be requeued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from coordinator.errors import SettingsError
from coordinator.queries import Q, int_array
from pairfarm.protocol import BatchStatus

#: states ``requeue`` takes batches from (the others are waiting or finished)
REQUEUABLE = (BatchStatus.FAILED, BatchStatus.LEASED, BatchStatus.POSTPROCESSING)


@dataclass(frozen=True, kw_only=True)
class BatchFilter:
    """Which batches: in one of ``states``; with ``reason`` in their last error (case
    insensitive); held last by ``worker`` (id, worker name or token name); ids in ``ids``
    (empty: any). None means no condition."""

    states: tuple[BatchStatus, ...] = (BatchStatus.FAILED,)
    reason: str | None = None
    worker: str | None = None
    ids: tuple[int, ...] = field(default_factory=tuple)

    def params(self) -> dict[str, Any]:
        return {"states": [s.value for s in self.states], "reason": self.reason or None,
                "worker": self.worker or None, "ids": int_array(self.ids)}


@dataclass(frozen=True)
class BatchRow:
    id: int
    status: str
    size: int
    attempts: int
    pp_attempts: int
    last_error: str | None
    updated_at: datetime
    worker_id: int | None
    worker_name: str | None


@dataclass(frozen=True)
class Requeued:
    """What ``requeue`` did (or, dry, would do): batches and their candidates."""

    batches: int
    candidates: int
    dry_run: bool


def list_batches(engine: sa.Engine, which: BatchFilter) -> list[BatchRow]:
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(Q.select_batches, which.params())]


def requeue(engine: sa.Engine, which: BatchFilter, *, dry_run: bool = False) -> Requeued:
    """Give the selected batches back to the queue in one transaction."""
    wrong = sorted(s.value for s in which.states if s not in REQUEUABLE)
    if wrong:
        raise SettingsError(f"batches in {wrong} cannot be requeued; "
                            f"only {[s.value for s in REQUEUABLE]}")
    query = Q.select_batches if dry_run else Q.requeue_batches
    with engine.begin() as conn:
        sizes = [int(r.size) for r in conn.execute(query, which.params())]
    return Requeued(len(sizes), sum(sizes), dry_run)


def _row(r: sa.Row[Any]) -> BatchRow:
    return BatchRow(id=r.id, status=r.status, size=int(r.size), attempts=int(r.attempts),
                    pp_attempts=int(r.pp_attempts), last_error=r.last_error,
                    updated_at=r.updated_at, worker_id=r.worker_id, worker_name=r.worker_name)
