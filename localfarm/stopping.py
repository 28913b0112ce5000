"""How ``pairfarm up`` stops: in order, and saying what really happened.

::

    SIGINT / SIGTERM to up -> StopRequested in the main thread (each later one: hurry)
    workers      SIGTERM: finish the batch in hand   (up to drain_timeout_s)
                 SIGTERM again: release it now       (up to release_s), then SIGKILL
    postprocess  the same
    the coordinator's stats: what became of the batches in hand
    coordinator  SIGTERM (up to stop_grace_s), then SIGKILL
    database     last (``up`` stops the embedded PostgreSQL it started)

The children run in their own sessions (children.py), so a Ctrl-C on the terminal
reaches ``up`` alone, which passes it on in this order. Each further Ctrl-C ends the
wait in progress (workers: release now; then: kill).

Error handling: a coordinator that cannot answer at stop time is reported as such
(``Shutdown.stats_error``); nothing is then claimed about the batches in hand.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from localfarm.children import Supervisor
from localfarm.errors import FarmError
from pairfarm.client import ClientError, CoordinatorClient
from pairfarm.protocol import BatchStatus, FarmStats

log = logging.getLogger("pairfarm.up")
#: statuses a batch can reach from ``leased`` by being finished
FINISHED = (BatchStatus.DOWNLOADED, BatchStatus.POSTPROCESSING, BatchStatus.DONE)


class StopRequested(KeyboardInterrupt):
    """``up`` got SIGINT or SIGTERM: the farm is stopped in order (see the module)."""


class StopSignals:
    """SIGINT / SIGTERM while installed: the first raises ``StopRequested``, later ones
    (and any once ``stopping`` is set) are counted in ``count``."""

    def __init__(self) -> None:
        self.count = 0
        self.stopping = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if not self.stopping:
            self.stopping = True
            raise StopRequested(name)
        log.warning("got %s again: not waiting any longer for the step in progress", name)

    def hurried(self) -> int:
        return self.count

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@dataclass
class Shutdown:
    """What stopping the farm did."""

    #: download batches leased when the workers were told to stop (None: unknown)
    in_hand: int | None = None
    finished: int = 0
    failed: int = 0
    #: download batches still leased once the workers were gone (None: unknown)
    still_leased: int | None = None
    #: children that did not stop in time and were killed
    killed: list[str] = field(default_factory=list)
    stats_error: str | None = None

    @property
    def released(self) -> int:
        """Batches in hand given back to the queue (released, or expired and reaped)."""
        if self.in_hand is None or self.still_leased is None:
            return 0
        return max(0, self.in_hand - self.finished - self.failed - self.still_leased)

    @property
    def accounted(self) -> bool:
        """True when every batch in hand is known to be finished, failed or released."""
        return self.still_leased == 0 and self.stats_error is None

    def account(self, before: FarmStats, after: FarmStats) -> None:
        self.in_hand = _count(before, BatchStatus.LEASED)
        self.still_leased = _count(after, BatchStatus.LEASED)
        self.finished = max(0, sum(_count(after, s) - _count(before, s) for s in FINISHED))
        self.failed = max(0, _count(after, BatchStatus.FAILED) - _count(before, BatchStatus.FAILED))


def _count(stats: FarmStats, status: BatchStatus) -> int:
    return stats.batches.get(status.value, 0)


@dataclass(frozen=True)
class StopTimes:
    drain_timeout_s: float
    release_s: float
    stop_grace_s: float


def stop_farm(supervisor: Supervisor, client: CoordinatorClient | None, times: StopTimes,
              signals: StopSignals) -> Shutdown:
    """Stop every child in the order of the module docstring; what happened."""
    signals.stopping = True
    shutdown = Shutdown()
    before = _stats(client, shutdown)
    drain = ((signal.SIGTERM, times.drain_timeout_s), (signal.SIGTERM, times.release_s))
    if signals.count:
        log.warning("stopping: the workers finish the batch in hand (up to %.0f s; Ctrl-C "
                    "again: release it now), then the coordinator and the database stop",
                    times.drain_timeout_s)
    names = [c.name for c in supervisor.children]
    for group in ({n for n in names if n.startswith("worker-")}, {"postprocess"}):
        shutdown.killed += supervisor.stop(group, stages=drain, hurried=signals.hurried)
    after = _stats(client, shutdown)
    if before is not None and after is not None:
        shutdown.account(before, after)
    shutdown.killed += supervisor.stop(grace=times.stop_grace_s, hurried=signals.hurried)
    return shutdown


def _stats(client: CoordinatorClient | None, shutdown: Shutdown) -> FarmStats | None:
    if client is None:
        shutdown.stats_error = "the coordinator was not started"
        return None
    try:
        return client.stats()
    except ClientError as exc:
        shutdown.stats_error = f"the coordinator did not answer: {exc}"
        return None


class FarmStopped(FarmError):
    """The farm was stopped by a signal before it finished; ``shutdown`` says how."""

    def __init__(self, signal_name: str, shutdown: Shutdown, out: Path) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
        self.shutdown = shutdown
        self.out = out
