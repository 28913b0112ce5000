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

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, leases: Leases, interval_s: float) -> None:
        self._leases = leases
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
            reaped = self._leases.reap()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("reaper: %s", exc)
            return
        for batch_id, status in reaped:
            log.info("lease of batch %d expired: now %s", batch_id, status)
