"""The download pipeline shared by the batches a worker has in hand (lease-ahead).

``SharedPipeline`` holds one ``Stage`` (``worker.batch``: httpx client, DNS cache, host
gate, body and pixel budgets, decode threads) and one limiter of ``concurrency`` fetch
slots for every batch it runs; ``download`` runs one batch on them::

    batch A: feed --> tasks --slot--> Stage.one --> writer A
    batch B: feed --> tasks --slot-/                 writer B      (B leased during A's tail)

So two batches in hand never have more than ``concurrency`` candidates in flight, and
their bodies and pixels come out of the same budgets. A slot is granted first come,
first served: a batch leased ahead waits behind the tail of the one before it.

The stage is renewed after it has served ``renew_after`` batches (its DNS answers and
host states grow with every host seen): the next batch starts on a fresh stage while the
old one finishes its tail, then closes. Only during that tail do two stages (and their
budgets) exist at once; the fetch slots stay shared.

``IdleClock`` measures the share of time with no candidate in flight: the worker's idle
fraction (``pairfarm_worker_idle_seconds_total``, ``pairfarm_worker_idle_fraction``).

Bytes on the wire are counted by the stage, not per batch: a batch reports the bytes its
stage received since the previous batch on that stage ended (for batches one after the
other, exactly its own), so the batches' figures add up to the stage's total and no byte
is counted twice.

Resource handling: stages are opened and closed in the pipeline's own nursery (``open``);
each batch runs ``worker.batch.run_batch`` (the loop ``download_batch`` runs) and its shard
files are removed on any error or cancellation (``into_shard``); the ``PreparedShard``
returned is committed or aborted by the caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import fsspec
import trio

from pairfarm.protocol import Candidate
from worker.batch import (
    Network,
    OnSample,
    PreparedShard,
    Recorder,
    Stage,
    into_shard,
    new_writer,
    open_stage,
    run_batch,
)
from worker.metrics import WorkerMetrics
from worker.settings import PipelineSettings
from worker.shards import Sample, ShardWriter

#: batches one stage serves before a fresh one takes over (bounds its DNS and host state)
RENEW_AFTER = 8


class IdleClock:
    """Seconds with no candidate in flight, since ``start``; Trio's clock."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._started = trio.current_time()
        self._busy = 0
        self._idle_since: float | None = self._started
        self._idle_s = 0.0

    def enter(self) -> None:
        if self._busy == 0 and self._idle_since is not None:
            self._add_idle(trio.current_time() - self._idle_since)
            self._idle_since = None
        self._busy += 1

    def leave(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle_since = trio.current_time()

    def _add_idle(self, seconds: float) -> None:
        self._idle_s += seconds
        self._metrics.idle_seconds.inc(seconds)
        self._metrics.idle_fraction.set(self.fraction())

    def idle_seconds(self) -> float:
        now = trio.current_time()
        return self._idle_s + (now - self._idle_since if self._idle_since is not None else 0)

    def fraction(self) -> float:
        """Idle seconds over the seconds since the clock started (0 before any time)."""
        wall = trio.current_time() - self._started
        return self.idle_seconds() / wall if wall > 0 else 0.0

    def flush(self) -> None:
        """The idle time so far into the metrics (an idle stretch counts as it goes)."""
        if self._idle_since is not None:
            now = trio.current_time()
            self._add_idle(now - self._idle_since)
            self._idle_since = now


@dataclass(eq=False)
class _Held:
    """One stage and the batches using it."""

    stage: Stage
    served: int = 0
    #: the stage's bytes already reported by a batch
    billed: int = 0
    users: int = 0
    retired: bool = False
    closed: trio.Event = field(default_factory=trio.Event)

    def close_if_unused(self) -> None:
        if self.retired and self.users == 0:
            self.closed.set()


@dataclass(eq=False)
class BatchRun:
    """What the run loop sees of a batch being downloaded."""

    size: int
    #: ``tail`` is set once this many or fewer candidates are unfinished (-1: never here)
    tail_at: int = -1
    #: set once at least one candidate has taken a fetch slot
    started: trio.Event = field(default_factory=trio.Event)
    #: set once the batch reached its tail (the run loop then leases the next one)
    tail: trio.Event = field(default_factory=trio.Event)
    finished: int = 0

    @property
    def unfinished(self) -> int:
        return self.size - self.finished

    def add_finished(self, count: int) -> None:
        self.finished += count
        if self.unfinished <= self.tail_at:
            self.tail.set()


class SharedPipeline:
    """Stages and fetch slots shared by the batches in hand. See the module docstring."""

    def __init__(self, settings: PipelineSettings, network: Network, metrics: WorkerMetrics,
                 nursery: trio.Nursery, *, renew_after: int = RENEW_AFTER) -> None:
        self._s = settings
        self._network = network
        self._metrics = metrics
        self._nursery = nursery
        self._renew_after = renew_after
        self._slots = trio.CapacityLimiter(settings.fetch.concurrency)
        self._current: _Held | None = None
        self._opening = trio.Lock()
        self.idle = IdleClock(metrics)
        self.stages_opened = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: PipelineSettings, network: Network,
                   metrics: WorkerMetrics, **kw: int) -> AsyncIterator[SharedPipeline]:
        async with trio.open_nursery() as nursery:
            pipeline = cls(settings, network, metrics, nursery, **kw)
            try:
                yield pipeline
            finally:
                pipeline._retire_current()
                pipeline.idle.flush()

    def _retire_current(self) -> None:
        if self._current is not None:
            self._current.retired = True
            self._current.close_if_unused()
            self._current = None

    async def _stage(self) -> _Held:
        """The current stage, or a fresh one once it has served ``renew_after`` batches."""
        async with self._opening:
            if self._current is not None and self._current.served >= self._renew_after:
                self._retire_current()
            if self._current is None:
                self._current = await self._nursery.start(self._keep_stage)
            self._current.served += 1
            return self._current

    async def _keep_stage(self, task_status: trio.TaskStatus[_Held]) -> None:
        async with open_stage(self._s, self._network, self._metrics) as stage:
            self.stages_opened += 1
            held = _Held(stage)
            task_status.started(held)
            await held.closed.wait()

    @asynccontextmanager
    async def _using(self) -> AsyncIterator[_Held]:
        held = await self._stage()
        held.users += 1
        try:
            yield held
        finally:
            held.users -= 1
            held.close_if_unused()

    async def download(self, batch_id: int, candidates: Sequence[Candidate], run: BatchRun,
                       *, fs: fsspec.AbstractFileSystem, directory: str,
                       on_sample: OnSample | None = None,
                       url_retries: int = 0) -> PreparedShard:
        """Fetch and process every candidate into a shard under temporary names; every
        candidate ends in exactly one ``Sample``. ``run`` follows the progress;
        ``url_retries`` is the lease's (``ShardWriter.url_retries``)."""
        writer = await new_writer(fs, directory, batch_id, self._s, url_retries=url_retries)
        run.add_finished(0)
        recorder = Recorder(self._metrics, on_sample)
        return await into_shard(writer, lambda: self._fill(candidates, run, writer, recorder))

    async def _fill(self, candidates: Sequence[Candidate], run: BatchRun, writer: ShardWriter,
                    recorder: Recorder) -> int:
        robots = self._network.robots
        if robots is not None:  # the farm's answers for the batch's origins, at once
            await robots.prepare(c.url for c in candidates)
        async with self._using() as held:
            await run_batch(candidates, self._s.fetch.concurrency,
                            partial(self._one, held.stage, run), writer,
                            partial(_written, recorder, run))
            wire = held.stage.wire_bytes - held.billed
            held.billed += wire
        if robots is not None:
            await robots.flush()
        return wire

    async def _one(self, stage: Stage, run: BatchRun, index: int,
                   candidate: Candidate) -> Sample:
        async with self._slots:
            run.started.set()
            self.idle.enter()
            try:
                return await stage.one(index, candidate)
            finally:
                self.idle.leave()


def _written(recorder: Recorder, run: BatchRun, samples: list[Sample]) -> None:
    recorder.all(samples)
    run.add_finished(len(samples))
