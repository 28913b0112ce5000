"""The reaper: a thread that returns expired leases to the queue every few seconds.

Resource handling: ``start`` starts one daemon thread; ``stop`` sets its event and joins
it. Error handling: a failed round (database briefly down) is logged and retried on the
next tick; the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading

import sqlalchemy as sa

from coordinator.leases import Leases
from coordinator.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, leases: Leases, interval_s: float,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self._leases = leases
        self._metrics = metrics
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pairfarm-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.tick()

    def tick(self) -> None:
        try:
            reaped = self._leases.reap_expired()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("reaper: %s", exc)
            return
        for expired in reaped:
            if self._metrics:
                self._metrics.expiries.labels(kind=expired.kind).inc()
            log.info("%s lease of batch %d expired: now %s", expired.kind, expired.batch_id,
                     expired.status)
