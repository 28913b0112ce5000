"""``pairfarm worker``: lease, download, write the shard, complete; heartbeats throughout.

At most two batches in hand, the second leased during the first's tail::

    register -> lease --204--> wait idle_poll_s (doubling while the queue stays empty,
                 |             up to idle_poll_max_s), lease again
                 |
                 +-- batch (a task): SharedPipeline.download  ||  heartbeat every interval
                 |     |-- LeaseLost (409) on a heartbeat: cancel, delete temp files
                 |     |-- shard written: one more heartbeat (the fence), rename, complete
                 |     `-- storage error: give the batch back (cause "worker")
                 `-- once lease_ahead_at or fewer of its candidates are unfinished (or it
                     ended), and fewer than 2 batches are in hand: lease the next one
                     (``ahead`` while one is still in hand; the coordinator refuses an
                     ahead lease that would take the last batch: asked again once the
                     batch in hand ended)

Lease-ahead (``lease_ahead_at``, 0: off, one batch at a time): the batches in hand share
one ``worker.pipeline.SharedPipeline``: ``concurrency`` fetch slots (first come, first
served, so the next batch takes the slots its predecessor's tail frees) and the memory
budgets; each has its own lease, heartbeats and report, and a lost lease or a failure
ends that batch only. The pipeline's ``IdleClock`` measures the time with no candidate
in flight (``pairfarm_worker_idle_seconds_total``, ``pairfarm_worker_idle_fraction``).

Before it registers, the worker checks that its output location can be written
(``worker.outputs``): a worker that cannot write shards stops before it takes a batch.

Signals: the first SIGTERM / SIGINT stops leasing, releases at once a batch whose
downloads have not started (leased ahead, waiting for slots), and lets the batches in
hand finish within ``drain_timeout_s``; past that, or on a second signal, the batch is released
(``fail`` with ``release=True``: no attempt is charged) and the worker exits. A worker
that holds no batch (registering, waiting to retry, idle) stops at the first signal. A
batch is never dropped silently: it is completed, released, or (when even the release
cannot reach the coordinator) logged as left to expire and be re-leased.

Error handling: ``Unavailable`` (network down, 5xx) is retried with capped exponential
backoff and jitter while the batch is kept; ``Throttled`` (429: the coordinator
quarantined this worker) is retried after its ``Retry-After``, the reason logged;
``Unauthorized`` ends the worker (``WorkerStopped``, its temporary files removed);
``LeaseLost`` discards the batch's work; ``Rejected`` on a report fails the batch with
the coordinator's message (an attempt is spent). A failure that is this machine's own
(``ShardWriteError``, ``OSError``: its disk, its output) gives the batch back with cause
``worker``, which spends no attempt; after ``stop_after_failures`` of them in a row, with
no batch completed in between, the worker stops (``WorkerStopped``); a batch still in hand
then is released. ``run`` raises ``WorkerStopped`` itself, never inside Trio's
``ExceptionGroup``.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import fsspec
import trio

from pairfarm.client import (
    AsyncCoordinatorClient,
    LeaseLost,
    Rejected,
    Throttled,
    Unauthorized,
    Unavailable,
)
from pairfarm.protocol import DownloadLease, DownloadReport, FailCause, FailReport
from worker.backoff import backoff_delay
from worker.batch import Network, OnSample, PreparedShard
from worker.errors import ShardWriteError, WorkerError
from worker.metrics import BatchResult, WorkerMetrics, build_metrics
from worker.outputs import check_output
from worker.pipeline import BatchRun, SharedPipeline
from worker.settings import RunSettings

log = logging.getLogger("pairfarm.worker")
T = TypeVar("T")
KIND = "download"


#: failures that are this machine's own (its disk, its output location): not the batch's
OWN_FAILURES = (ShardWriteError, OSError)
REFUSED = "the coordinator refused this worker's token (revoked?): stopping"
#: the longest a 429 (a quarantine) makes the worker wait before it asks again
MAX_THROTTLE_S = 3600.0
#: batches in hand at once: the one finishing and the one leased during its tail
IN_HAND = 2


class WorkerStopped(WorkerError):
    """The worker cannot go on: its token was refused, its output cannot be written, or
    its batches keep failing on this machine."""


@dataclass
class RunSummary:
    batches_completed: int = 0
    batches_lost: int = 0
    batches_released: int = 0
    batches_failed: int = 0
    samples: int = 0
    #: share of the run loop's time with no candidate in flight (``IdleClock``)
    idle_fraction: float = 0.0


@dataclass
class _Signals:
    """What the operator asked for: stop leasing (drain), or give the batch back now."""

    draining: trio.Event = field(default_factory=trio.Event)
    abort: trio.Event = field(default_factory=trio.Event)


@dataclass
class _BatchState:
    lost: bool = False
    released: bool = False
    #: the coordinator was told (complete, fail, release) or the lease is gone
    settled: bool = False


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
        #: the scope of a wait while no batch is held; the first signal cancels it
        self._unheld: trio.CancelScope | None = None
        self._own_failures = 0
        #: leases in a row that found nothing: each idle wait doubles, up to idle_poll_max_s
        self._empty_polls = 0
        self._pipeline: SharedPipeline | None = None
        #: set (and replaced) each time a batch leaves the worker's hands
        self._batch_ended = trio.Event()
        self.summary = RunSummary()

    def _tally(self, result: BatchResult) -> None:
        """One batch ended: in the summary and in ``pairfarm_worker_batches_total``."""
        name = f"batches_{result.value}"
        setattr(self.summary, name, getattr(self.summary, name) + 1)
        self._metrics.batch(result)

    def request_stop(self) -> None:
        """First signal: drain (and stop at once when no batch is held). Second: abort
        the batch in hand."""
        if self._signals.draining.is_set():
            self._signals.abort.set()
        self._signals.draining.set()
        if self._unheld is not None:
            self._unheld.cancel()

    async def run(self) -> RunSummary:
        """Work until told to stop, idle (with ``exit_when_idle``) or out of batches.

        Raises ``WorkerStopped`` (unwrapped) when the coordinator refuses the token, the
        output cannot be written, or batches keep failing on this machine.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals)
                await self._check_output()
                await self._register()
                async with SharedPipeline.open(self._s.pipeline, self._network,
                                               self._metrics) as pipeline:
                    self._pipeline = pipeline
                    try:
                        await self._loop()
                    finally:
                        self.summary.idle_fraction = pipeline.idle.fraction()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _stopped_in(group) from None
        return self.summary

    async def _check_output(self) -> None:
        try:
            await trio.to_thread.run_sync(check_output, self._fs, self._dir)
        except ShardWriteError as exc:
            raise WorkerStopped(f"cannot write shards to {self._s.output}: {exc}") from exc

    @contextmanager
    def _while_unheld(self) -> Iterator[trio.CancelScope]:
        """A scope the first signal cancels: for waits while the worker holds no batch,
        or before it leases the next one."""
        with trio.CancelScope() as scope:
            self._unheld = scope
            if self._signals.draining.is_set():
                scope.cancel()
            try:
                yield scope
            finally:
                self._unheld = None

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                log.warning("got %s: %s", signal.Signals(signum).name,
                            "releasing the batch in hand" if self._signals.draining.is_set()
                            else "finishing the batch in hand, then exiting")
                self.request_stop()

    async def _register(self) -> None:
        info = None
        with self._while_unheld():
            info = await self._call("register", lambda: self._client.register(self._s.name),
                                    self._signals.draining)
        if info is not None:
            self._heartbeat_s = info.heartbeat_interval_s
            log.info("registered as worker %d (heartbeat every %.0fs)", info.worker_id,
                     self._heartbeat_s)

    async def _loop(self) -> None:
        """Lease while not draining; each batch runs in its own task, the next one leased
        once the last one reached its tail and fewer than ``IN_HAND`` are in hand."""
        done = 0
        in_hand = trio.Semaphore(IN_HAND)
        async with trio.open_nursery() as batches:
            while not self._signals.draining.is_set():
                if self._s.max_batches is not None and done >= self._s.max_batches:
                    return
                if not await self._unless_drained(in_hand.acquire):
                    return
                ahead = in_hand.value < IN_HAND - 1  # another batch is still in hand
                ended = self._batch_ended
                lease = await self._call(
                    "lease", partial(self._client.lease_download, self._s.max_batch,
                                     ahead=ahead),
                    self._signals.draining)
                if lease is None:
                    in_hand.release()
                    if ahead:
                        # the coordinator keeps the last batch for a worker with nothing in
                        # hand: ask again once a batch in hand ended (at once if one did)
                        await self._unless_drained(ended.wait)
                        continue
                    if self._s.exit_when_idle or self._signals.draining.is_set():
                        return
                    await self._idle()
                    continue
                self._empty_polls = 0
                run = BatchRun(size=len(lease.candidates), tail_at=self._tail_at())
                batches.start_soon(self._hold, lease, run, in_hand)
                done += 1
                await self._unless_drained(run.tail.wait)

    def _tail_at(self) -> int:
        """Unfinished candidates at which the next batch is leased (-1: at the end)."""
        return self._s.lease_ahead_at if self._s.lease_ahead_at > 0 else -1

    async def _unless_drained(self, wait: Callable[[], Awaitable[object]]) -> bool:
        """``wait()``; False when the first signal came first (``wait`` cancelled)."""
        with self._while_unheld() as scope:
            await wait()
        return not scope.cancelled_caught

    async def _hold(self, lease: DownloadLease, run: BatchRun, in_hand: trio.Semaphore) -> None:
        try:
            await self._work(lease, run)
        finally:
            in_hand.release()
            run.tail.set()
            self._batch_ended.set()
            self._batch_ended = trio.Event()

    async def _idle(self) -> None:
        """Wait before asking an empty queue again: ``idle_poll_s`` doubled for each lease
        in a row that found nothing, up to ``idle_poll_max_s``, with equal jitter (thousands
        of idle workers then cost the coordinator a few requests a second, spread out)."""
        s = self._s
        wait = backoff_delay(self._empty_polls, base=s.idle_poll_s,
                             cap=max(s.idle_poll_s, s.idle_poll_max_s), rng=self._rng)
        self._empty_polls += 1
        log.info("no batch to lease; polling again in %.0fs", wait)
        if self._pipeline is not None:
            self._pipeline.idle.flush()
        with trio.move_on_after(wait):
            await self._signals.draining.wait()

    async def _call(self, what: str, call: Callable[[], Awaitable[T]],
                    stop: trio.Event) -> T | None:
        """``call`` retried on ``Unavailable`` with backoff; None when ``stop`` is set
        (the first signal while no batch is held, the second while one is)."""
        attempt = 0
        while True:
            try:
                return await call()
            except Unauthorized as exc:
                raise WorkerStopped(f"{REFUSED} ({exc})") from exc
            except Unavailable as exc:
                delay = backoff_delay(attempt, base=self._s.backoff_base_s,
                                      cap=self._s.backoff_cap_s, rng=self._rng)
                log.warning("%s: coordinator unavailable (%s); retry %d in %.1fs", what, exc,
                            attempt + 1, delay)
            except Throttled as exc:
                delay = min(MAX_THROTTLE_S, exc.retry_after or self._s.idle_poll_s)
                log.error("%s: refused for now (%s); trying again in %.0fs", what, exc, delay)
            if await self._sleep_unless(delay, stop):
                return None
            attempt += 1

    @staticmethod
    async def _sleep_unless(delay: float, stop: trio.Event) -> bool:
        """Wait ``delay`` seconds; True (at once) when ``stop`` is or gets set."""
        with trio.move_on_after(delay):
            await stop.wait()
            return True
        return False

    async def _work(self, lease: DownloadLease, run: BatchRun) -> None:
        log.info("batch %d: %d candidates (attempt %d)", lease.batch_id, len(lease.candidates),
                 lease.attempt)
        state = _BatchState()
        try:
            await self._settle(lease, run, state)
        except BaseException as exc:
            # cancelled because the worker stops (the other batch's WorkerStopped)
            if not state.settled and _cancelled(exc):
                with trio.CancelScope(shield=True):
                    await self._release(lease)
            raise

    async def _settle(self, lease: DownloadLease, run: BatchRun, state: _BatchState) -> None:
        prepared = await self._download(lease, run, state)
        if prepared is None:
            state.settled = True
            return
        try:
            if await self._fence(lease, state):
                await self._complete(lease, prepared)
            state.settled = True
        finally:
            # whatever is left under temporary names (nothing once committed)
            await prepared.abort()

    async def _download(self, lease: DownloadLease, run: BatchRun,
                        state: _BatchState) -> PreparedShard | None:
        assert self._pipeline is not None
        prepared: PreparedShard | None = None
        failure: str | None = None
        on_sample = self._progress(lease) if self._progress else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats, lease, state, nursery.cancel_scope)
            nursery.start_soon(self._abort_when_told, lease, run, state, nursery.cancel_scope)
            try:
                prepared = await self._pipeline.download(
                    lease.batch_id, lease.candidates, run, fs=self._fs, directory=self._dir,
                    on_sample=on_sample, url_retries=lease.url_retries)
            except (*OWN_FAILURES, BaseExceptionGroup) as exc:
                failure = _own_failure(exc)
                if failure is None:
                    raise
            nursery.cancel_scope.cancel()
        if failure is not None:
            await self._failed_here(lease, failure)
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
        except Unauthorized as exc:
            raise WorkerStopped(f"{REFUSED} ({exc})") from exc
        except LeaseLost as exc:
            log.warning("batch %d: lease lost (%s); discarding the work", lease.batch_id, exc)
            state.lost = True
            self._tally(BatchResult.LOST)
            return False
        except Unavailable as exc:
            log.warning("batch %d: heartbeat failed (%s); keeping the batch", lease.batch_id,
                        exc)
        return True

    async def _abort_when_told(self, lease: DownloadLease, run: BatchRun, state: _BatchState,
                               scope: trio.CancelScope) -> None:
        await self._signals.draining.wait()
        if run.started.is_set():
            with trio.move_on_after(self._s.drain_timeout_s):
                await self._signals.abort.wait()
        log.warning("batch %d: releasing it unfinished%s", lease.batch_id,
                    "" if run.started.is_set() else " (not started)")
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
        except (Unavailable, LeaseLost, Rejected, Unauthorized) as exc:
            log.error("batch %d: could not release it (%s); it will be re-leased when its "
                      "lease expires at %s", lease.batch_id, exc, lease.lease_expires_at)

    async def _fence(self, lease: DownloadLease, state: _BatchState) -> bool:
        """A heartbeat right before the rename: don't publish files for a lost lease."""
        return await self._beat(lease, state)

    async def _complete(self, lease: DownloadLease, prepared: PreparedShard) -> None:
        try:
            files = await prepared.commit()
        except OWN_FAILURES as exc:
            await self._failed_here(lease, f"shard write failed: {exc}")
            return
        report = DownloadReport(lease_token=lease.lease_token, shard=files,
                                outcomes=dict(prepared.outcomes),
                                bytes_downloaded=prepared.stats.bytes_downloaded,
                                duration_s=prepared.stats.end_time - prepared.stats.start_time,
                                retry=prepared.writer.retry_requests())
        try:
            state = await self._call("complete", lambda: self._client.complete(
                KIND, lease.batch_id, report), self._signals.abort)
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
        self._own_failures = 0
        self.summary.samples += prepared.count
        log.info("batch %d done: %s", lease.batch_id, dict(prepared.outcomes))

    async def _failed_here(self, lease: DownloadLease, reason: str) -> None:
        """The batch failed for this machine's own reasons: give it back without spending
        an attempt; stop after ``stop_after_failures`` in a row."""
        await self._fail(lease, reason, FailCause.WORKER)
        self._own_failures += 1
        if self._own_failures >= self._s.stop_after_failures:
            raise WorkerStopped(f"stopping: {self._own_failures} batches in a row failed on "
                                f"this machine: {reason}")

    async def _fail(self, lease: DownloadLease, reason: str,
                    cause: FailCause = FailCause.BATCH) -> None:
        log.error("batch %d failed (%s): %s", lease.batch_id,
                  "on this machine" if cause is FailCause.WORKER else "the batch", reason)
        self._tally(BatchResult.FAILED)
        report = FailReport(lease_token=lease.lease_token, reason=reason[:2000], cause=cause)
        try:
            await self._call("fail", lambda: self._client.fail(KIND, lease.batch_id, report),
                             self._signals.abort)
        except (LeaseLost, Rejected) as exc:
            log.warning("batch %d: failure report refused (%s)", lease.batch_id, exc)


def _own_failure(exc: BaseException) -> str | None:
    """The message of a failure that is this machine's own (alone or the only kind in
    a group, as Trio's nurseries raise it); None for anything else."""
    if isinstance(exc, BaseExceptionGroup):
        mine, rest = exc.split(OWN_FAILURES)
        if mine is None or rest is not None:
            return None
        return _own_failure(_leaves(mine)[0])
    return f"shard write failed: {exc}" if isinstance(exc, OWN_FAILURES) else None


def _cancelled(exc: BaseException) -> bool:
    """``trio.Cancelled``, alone or as the only kind in a group (Trio's nurseries)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(isinstance(leaf, trio.Cancelled) for leaf in _leaves(exc))
    return isinstance(exc, trio.Cancelled)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _stopped_in(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What ``run`` raises for a group out of its nursery: the ``WorkerStopped`` in it,
    else the one exception it holds, else the group itself."""
    leaves = _leaves(group)
    stopped = [exc for exc in leaves if isinstance(exc, WorkerStopped)]
    if stopped:
        return stopped[0]
    return leaves[0] if len(leaves) == 1 else group
