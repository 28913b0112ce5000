"""``pairfarm worker``: lease, download, write the shard, complete; heartbeats throughout.

One batch at a time::

    register -> lease --204--> wait idle_poll_s, lease again
                 |
                 +-- batch: download_batch  ||  heartbeat every interval
                       |-- LeaseLost (409) on a heartbeat: cancel, delete temp files, next
                       |-- shard written: one more heartbeat (the fence), rename, complete
                       `-- storage error: report the batch as failed, next

Signals: the first SIGTERM / SIGINT stops leasing and lets the batch in hand finish
within ``drain_timeout_s``; past that, or on a second signal, the batch is released
(``fail`` with ``release=True``: no attempt is charged) and the worker exits. A batch is
never dropped silently: it is completed, released, or (when even the release cannot
reach the coordinator) logged as left to expire and be re-leased.

Error handling: ``Unavailable`` (network down, 5xx) is retried with capped exponential
backoff and jitter while the batch is kept; ``Unauthorized`` ends the worker
(``WorkerStopped``); ``LeaseLost`` discards the batch's work; ``Rejected`` on a report
fails the batch with the coordinator's message.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
import trio

from pairfarm.client import AsyncCoordinatorClient, LeaseLost, Rejected, Unauthorized, Unavailable
from pairfarm.protocol import DownloadLease, DownloadReport, FailReport
from worker.backoff import backoff_delay
from worker.batch import Network, OnSample, PreparedShard, download_batch
from worker.errors import ShardWriteError, WorkerError
from worker.metrics import BatchResult, WorkerMetrics, build_metrics
from worker.settings import RunSettings

log = logging.getLogger("pairfarm.worker")
T = TypeVar("T")
KIND = "download"


class WorkerStopped(WorkerError):
    """The worker cannot go on (its token was refused)."""


@dataclass
class RunSummary:
    batches_completed: int = 0
    batches_lost: int = 0
    batches_released: int = 0
    batches_failed: int = 0
    samples: int = 0


@dataclass
class _Signals:
    """What the operator asked for: stop leasing (drain), or give the batch back now."""

    draining: trio.Event = field(default_factory=trio.Event)
    abort: trio.Event = field(default_factory=trio.Event)


@dataclass
class _BatchState:
    lost: bool = False
    released: bool = False


ProgressFactory = Callable[[DownloadLease], OnSample]


class RunLoop:
    """The worker's main loop. See the module docstring."""

    def __init__(self, settings: RunSettings, client: AsyncCoordinatorClient,
                 fs: fsspec.AbstractFileSystem, directory: str, *,
                 network: Network | None = None, rng: random.Random | None = None,
                 progress: ProgressFactory | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self._s = settings
        self._client = client
        self._fs = fs
        self._dir = directory
        self._network = network or Network()
        self._rng = rng or random.Random()
        self._progress = progress
        self._metrics = metrics or build_metrics()
        self._signals = _Signals()
        self._heartbeat_s = 30.0
        self.summary = RunSummary()

    def _tally(self, result: BatchResult) -> None:
        """One batch ended: in the summary and in ``pairfarm_worker_batches_total``."""
        name = f"batches_{result.value}"
        setattr(self.summary, name, getattr(self.summary, name) + 1)
        self._metrics.batch(result)

    def request_stop(self) -> None:
        """First signal: drain. Second: abort the batch in hand."""
        if self._signals.draining.is_set():
            self._signals.abort.set()
        self._signals.draining.set()

    async def run(self) -> RunSummary:
        """Work until told to stop, idle (with ``exit_when_idle``) or out of batches.

        Raises ``WorkerStopped`` (unwrapped) when the coordinator refuses the token.
        """
        stopped: WorkerStopped | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals)
            try:
                await self._register()
                await self._loop()
            except WorkerStopped as exc:
                stopped = exc
            nursery.cancel_scope.cancel()
        if stopped is not None:
            raise stopped
        return self.summary

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                log.warning("got %s: %s", signal.Signals(signum).name,
                            "releasing the batch in hand" if self._signals.draining.is_set()
                            else "finishing the batch in hand, then exiting")
                self.request_stop()

    async def _register(self) -> None:
        info = await self._call("register", lambda: self._client.register(self._s.name))
        if info is not None:
            self._heartbeat_s = info.heartbeat_interval_s
            log.info("registered as worker %d (heartbeat every %.0fs)", info.worker_id,
                     self._heartbeat_s)

    async def _loop(self) -> None:
        done = 0
        while not self._signals.draining.is_set():
            if self._s.max_batches is not None and done >= self._s.max_batches:
                return
            lease = await self._call("lease",
                                     lambda: self._client.lease_download(self._s.max_batch))
            if lease is None:
                if self._s.exit_when_idle or self._signals.draining.is_set():
                    return
                await self._idle()
                continue
            await self._work(lease)
            done += 1

    async def _idle(self) -> None:
        log.info("no batch to lease; polling again in %.0fs", self._s.idle_poll_s)
        with trio.move_on_after(self._s.idle_poll_s):
            await self._signals.draining.wait()

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call`` retried on ``Unavailable`` with backoff; None when told to stop."""
        attempt = 0
        while True:
            try:
                return await call()
            except Unauthorized as exc:
                raise WorkerStopped(f"the coordinator refused our token: {exc}") from exc
            except Unavailable as exc:
                delay = backoff_delay(attempt, base=self._s.backoff_base_s,
                                      cap=self._s.backoff_cap_s, rng=self._rng)
                log.warning("%s: coordinator unavailable (%s); retry %d in %.1fs", what, exc,
                            attempt + 1, delay)
            if await self._sleep_or_abort(delay, what):
                return None
            attempt += 1

    async def _sleep_or_abort(self, delay: float, what: str) -> bool:
        stop = self._signals.abort if what != "lease" else self._signals.draining
        with trio.move_on_after(delay):
            await stop.wait()
            return True
        return False

    async def _work(self, lease: DownloadLease) -> None:
        log.info("batch %d: %d candidates (attempt %d)", lease.batch_id, len(lease.candidates),
                 lease.attempt)
        state = _BatchState()
        prepared = await self._download(lease, state)
        if prepared is None:
            return
        if not await self._fence(lease, state):
            await prepared.abort()
            return
        await self._complete(lease, prepared)

    async def _download(self, lease: DownloadLease, state: _BatchState) -> PreparedShard | None:
        prepared: PreparedShard | None = None
        failure: str | None = None
        on_sample = self._progress(lease) if self._progress else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats, lease, state, nursery.cancel_scope)
            nursery.start_soon(self._abort_when_told, lease, state, nursery.cancel_scope)
            try:
                prepared = await download_batch(
                    lease.batch_id, lease.candidates, settings=self._s.pipeline, fs=self._fs,
                    directory=self._dir, network=self._network, on_sample=on_sample,
                    metrics=self._metrics)
            except ShardWriteError as exc:
                failure = f"shard write failed: {exc}"
            nursery.cancel_scope.cancel()
        if failure is not None:
            await self._fail(lease, failure)
            return None
        if state.lost or state.released:
            return None
        return prepared

    async def _heartbeats(self, lease: DownloadLease, state: _BatchState,
                          scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self._heartbeat_s)
            if not await self._beat(lease, state):
                scope.cancel()
                return

    async def _beat(self, lease: DownloadLease, state: _BatchState) -> bool:
        """One heartbeat; False when the lease is lost (the work must be discarded)."""
        try:
            await self._client.heartbeat(KIND, lease.batch_id, lease.lease_token)
        except LeaseLost as exc:
            log.warning("batch %d: lease lost (%s); discarding the work", lease.batch_id, exc)
            state.lost = True
            self._tally(BatchResult.LOST)
            return False
        except Unavailable as exc:
            log.warning("batch %d: heartbeat failed (%s); keeping the batch", lease.batch_id,
                        exc)
        return True

    async def _abort_when_told(self, lease: DownloadLease, state: _BatchState,
                               scope: trio.CancelScope) -> None:
        await self._signals.draining.wait()
        with trio.move_on_after(self._s.drain_timeout_s):
            await self._signals.abort.wait()
        log.warning("batch %d: releasing it unfinished", lease.batch_id)
        state.released = True
        with trio.CancelScope(shield=True):
            await self._release(lease)
        scope.cancel()

    async def _release(self, lease: DownloadLease) -> None:
        report = FailReport(lease_token=lease.lease_token, reason="worker shutting down",
                            release=True)
        try:
            with trio.move_on_after(30):
                await self._client.fail(KIND, lease.batch_id, report)
                self._tally(BatchResult.RELEASED)
                return
            raise Unavailable("release timed out")
        except (Unavailable, LeaseLost, Rejected) as exc:
            log.error("batch %d: could not release it (%s); it will be re-leased when its "
                      "lease expires at %s", lease.batch_id, exc, lease.lease_expires_at)

    async def _fence(self, lease: DownloadLease, state: _BatchState) -> bool:
        """A heartbeat right before the rename: don't publish files for a lost lease."""
        return await self._beat(lease, state)

    async def _complete(self, lease: DownloadLease, prepared: PreparedShard) -> None:
        files = await prepared.commit()
        report = DownloadReport(lease_token=lease.lease_token, shard=files,
                                outcomes=dict(prepared.outcomes),
                                bytes_downloaded=prepared.stats.bytes_downloaded,
                                duration_s=prepared.stats.end_time - prepared.stats.start_time)
        try:
            state = await self._call("complete", lambda: self._client.complete(
                KIND, lease.batch_id, report))
        except LeaseLost as exc:
            log.warning("batch %d: completion refused, lease lost (%s)", lease.batch_id, exc)
            self._tally(BatchResult.LOST)
            return
        except Rejected as exc:
            await self._fail(lease, f"report rejected: {exc}")
            return
        if state is None:
            log.error("batch %d: stopped before the coordinator took the report; it will be "
                      "re-leased when its lease expires", lease.batch_id)
            return
        self._tally(BatchResult.COMPLETED)
        self.summary.samples += prepared.count
        log.info("batch %d done: %s", lease.batch_id, dict(prepared.outcomes))

    async def _fail(self, lease: DownloadLease, reason: str) -> None:
        log.error("batch %d failed: %s", lease.batch_id, reason)
        self._tally(BatchResult.FAILED)
        report = FailReport(lease_token=lease.lease_token, reason=reason[:2000])
        try:
            await self._call("fail", lambda: self._client.fail(KIND, lease.batch_id, report))
        except (LeaseLost, Rejected) as exc:
            log.warning("batch %d: failure report refused (%s)", lease.batch_id, exc)
