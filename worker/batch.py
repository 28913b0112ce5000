"""Download one batch into one shard: the worker's pipeline.

Stages, each owning and closing its channel ends::

    feeder --(index, candidate)--> N fetch tasks --Sample--> writer --> ShardWriter
                                     |  fetch (Trio + httpx, guarded)
                                     |  decode + resize (thread, CapacityLimiter)

``run_batch`` is that feed/fetch/write loop, shared with ``worker.pipeline`` (which runs
it on a stage kept across batches). ``download_batch`` returns a ``PreparedShard`` whose
files are still under temporary names; ``commit`` renames them and writes the stats json,
``abort`` deletes them. The run loop checks that it still holds the lease between the two.

Resource handling: the httpx client, the DNS cache and the host gate live for one
batch. Memory has two budgets: response bodies, from before their first byte until
their decode ends (the fetcher's ``BodyBudget``, ``body_memory_bytes``), and the pixels
of the images being decoded (a ``ByteBudget`` of ``decode_memory_bytes``, each image
taking ``imaging.decode_cost`` of it, learnt from its header). A body waits for pixels
while it holds its bytes, never the other way round, and pixel holders only wait for a
decode thread, so neither wait can deadlock. Decoding runs in at most
``decode_threads`` threads at once. On any error or cancellation the
temporary files are removed. The ``WorkerMetrics`` passed in (``worker.metrics``)
see every fetch and decode, and every written sample's outcome.

Error handling: each candidate's failure is a ``FetchFailure`` turned into its
``Sample`` outcome; anything else (a storage error, a bug) fails the whole batch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
import trio

from pairfarm.outcomes import Outcome
from pairfarm.protocol import Candidate, ShardFiles
from pairfarm.shardformat import PARQUET_COLUMNS
from worker.blur import parse_boxes
from worker.budget import ByteBudget, return_freed_memory
from worker.errors import FetchFailure, ImageRejected
from worker.fetcher import Fetched, Fetcher
from worker.hosts import HostGate
from worker.imaging import (
    NO_ROW,
    OpenedImage,
    ProcessedImage,
    RowInput,
    finish_image,
    open_image,
)
from worker.metrics import WorkerMetrics, build_metrics
from worker.network import Dialer, GuardedBackend, TrioDialer
from worker.resolver import CachingResolver, Resolver, SystemResolver
from worker.robotstxt import RobotsCache, RobotsFetcher, RobotsGuard
from worker.settings import ImageSettings, PipelineSettings
from worker.shards import Sample, ShardStats, ShardWriter
from worker.transport import build_client

_WRITE_GROUP = 63
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class Network:
    """How the pipeline reaches the web: the resolver and the dialer (tests swap them)."""

    resolver: Resolver = field(default_factory=SystemResolver)
    dialer: Dialer = field(default_factory=TrioDialer)
    #: robots.txt answers (``worker.robotstxt``), kept across batches and stages: every
    #: candidate's origin is asked before the candidate is fetched; None: not asked
    robots: RobotsCache | None = None


@dataclass
class PreparedShard:
    """A written shard still under temporary names."""

    writer: ShardWriter
    stats: ShardStats
    outcomes: Counter[str]

    @property
    def count(self) -> int:
        return sum(self.outcomes.values())

    async def commit(self) -> ShardFiles:
        return await trio.to_thread.run_sync(self.writer.commit, self.stats)

    async def publish(self) -> None:
        """Finish the shard in any layout (``commit`` is the farm's, webdataset only)."""
        await trio.to_thread.run_sync(self.writer.publish, self.stats)

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.writer.abort)


OnSample = Callable[[Sample], None]


async def download_batch(batch_id: int, candidates: Sequence[Candidate], *,
                         settings: PipelineSettings, fs: fsspec.AbstractFileSystem,
                         directory: str, network: Network | None = None,
                         on_sample: OnSample | None = None,
                         metrics: WorkerMetrics | None = None,
                         layout: str = "webdataset") -> PreparedShard:
    """Fetch and process every candidate; every one ends in exactly one ``Sample``.

    ``metrics`` (a fresh registry by default) records fetches, decodes and outcomes;
    ``layout`` is where the samples go (``worker.layouts``)."""
    net = network or Network()
    writer = await new_writer(fs, directory, batch_id, settings, layout=layout)
    recorder = Recorder(metrics or build_metrics(), on_sample)
    return await into_shard(writer, lambda: _run(candidates, settings, net, writer, recorder))


async def new_writer(fs: fsspec.AbstractFileSystem, directory: str, batch_id: int,
                     settings: PipelineSettings, *, url_retries: int = 0,
                     layout: str = "webdataset") -> ShardWriter:
    """The batch's ``ShardWriter`` (opened in a thread)."""
    return await trio.to_thread.run_sync(lambda: ShardWriter(
        fs, directory, batch_id, image_ext=settings.image.encode_format,
        url_retries=url_retries, columns=optional_columns(settings.image), layout=layout))


def optional_columns(image: ImageSettings) -> tuple[str, ...]:
    """The shard's columns beyond the fixed ones: ``exif``, the ``compute_hash`` digest
    (``sha256`` is always there)."""
    wanted = (*(("exif",) if image.extract_exif else ()), image.compute_hash)
    return tuple(name for name in wanted if name not in PARQUET_COLUMNS)


def row_input(candidate: Candidate, image: ImageSettings) -> RowInput:
    """What the candidate's input row asks (its ``verify_hash`` and ``bbox_col`` cells)."""
    if image.verify_hash is None and image.bbox_col is None:
        return NO_ROW
    extra = candidate.extra
    expected = extra.get(image.verify_hash) if image.verify_hash is not None else None
    boxes = parse_boxes(extra.get(image.bbox_col)) if image.bbox_col is not None else ()
    return RowInput(expected_hash=None if expected is None else str(expected), boxes=boxes)


async def into_shard(writer: ShardWriter, fill: Callable[[], Awaitable[int]]) -> PreparedShard:
    """``fill`` writes the samples and returns the bytes on the wire; the shard's files are
    removed on any error or cancellation."""
    start = time.time()
    try:
        wire = await fill()
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(writer.abort)
        raise
    stats = ShardStats(start_time=start, end_time=time.time(), bytes_downloaded=wire)
    return PreparedShard(writer=writer, stats=stats, outcomes=writer.outcome_counts())


@dataclass(frozen=True)
class Recorder:
    """What happens to a written sample: its outcome counted, then ``on_sample``."""

    metrics: WorkerMetrics
    on_sample: OnSample | None = None

    def __call__(self, sample: Sample) -> None:
        self.metrics.outcome(sample.outcome.value)
        if self.on_sample is not None:
            self.on_sample(sample)

    def all(self, samples: list[Sample]) -> None:
        for sample in samples:
            self(sample)


@asynccontextmanager
async def open_stage(settings: PipelineSettings, network: Network,
                     metrics: WorkerMetrics | None = None) -> AsyncIterator[Stage]:
    """A ``Stage`` with a fresh client, DNS cache and host gate; closed on exit."""
    return_freed_memory()
    backend = GuardedBackend(CachingResolver(network.resolver), settings.fetch.policy,
                             network.dialer)
    recorded = metrics or build_metrics()
    async with build_client(settings.fetch, backend, formats=settings.image.formats) as client:
        gate = HostGate(per_host=settings.fetch.per_host,
                        max_delay=settings.fetch.max_retry_after)
        fetcher = Fetcher(settings.fetch, client, gate, recorded, formats=settings.image.formats)
        robots = None if network.robots is None else network.robots.bound(
            RobotsFetcher(settings.robots, settings.fetch, client))
        yield Stage(fetcher, settings, recorded, robots=robots)


async def _run(candidates: Sequence[Candidate], settings: PipelineSettings, net: Network,
               writer: ShardWriter, recorder: Recorder) -> int:
    async with open_stage(settings, net, recorder.metrics) as stage:
        await run_batch(candidates, settings.fetch.concurrency, stage.one, writer,
                        recorder.all)
        return stage.wire_bytes


Work = Callable[[int, Candidate], Awaitable[Sample]]


async def run_batch(candidates: Sequence[Candidate], concurrency: int, work: Work,
                    writer: ShardWriter, written: Callable[[list[Sample]], None]) -> None:
    """Feed the candidates to up to ``concurrency`` tasks running ``work``; write their
    samples as they come, then call ``written`` with each group written."""
    jobs_send, jobs_recv = trio.open_memory_channel[tuple[int, Candidate]](0)
    done_send, done_recv = trio.open_memory_channel[Sample](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_feed, candidates, jobs_send)
        async with done_send, jobs_recv:
            for _ in range(min(concurrency, max(1, len(candidates)))):
                nursery.start_soon(_work, work, jobs_recv.clone(), done_send.clone())
        nursery.start_soon(_write, done_recv, writer, written)


async def _feed(candidates: Sequence[Candidate],
                send: trio.MemorySendChannel[tuple[int, Candidate]]) -> None:
    async with send:
        for item in enumerate(candidates):
            await send.send(item)


async def _work(work: Work, jobs: trio.MemoryReceiveChannel[tuple[int, Candidate]],
                done: trio.MemorySendChannel[Sample]) -> None:
    async with jobs, done:
        async for index, candidate in jobs:
            await done.send(await work(index, candidate))


async def _write(recv: trio.MemoryReceiveChannel[Sample], writer: ShardWriter,
                 written: Callable[[list[Sample]], None]) -> None:
    """Write samples as they come; whatever is already queued goes in one thread call."""
    async with recv:
        async for sample in recv:
            samples = [sample, *_queued(recv, limit=_WRITE_GROUP)]
            await trio.to_thread.run_sync(_add_all, writer, samples)
            written(samples)


def _queued(recv: trio.MemoryReceiveChannel[Sample], limit: int) -> list[Sample]:
    queued: list[Sample] = []
    while len(queued) < limit:
        try:
            queued.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return queued


def _add_all(writer: ShardWriter, samples: list[Sample]) -> None:
    for sample in samples:
        writer.add(sample)


class Stage:
    """Fetch + decode of a candidate (``one``); ``run_batch`` runs it in each task."""

    def __init__(self, fetcher: Fetcher, settings: PipelineSettings,
                 metrics: WorkerMetrics | None = None, *,
                 robots: RobotsGuard | None = None) -> None:
        self._fetcher = fetcher
        self._robots = robots
        self._image = settings.image
        self._decoders = trio.CapacityLimiter(settings.decode_threads)
        self._pixels = ByteBudget(settings.decode_memory_bytes)
        self._metrics = metrics or build_metrics()

    @property
    def wire_bytes(self) -> int:
        return self._fetcher.wire_bytes

    async def fetch(self, url: str) -> Fetched:
        """The body at ``url``, no longer counted in the body budget (a fetch alone)."""
        fetched = await self._fetcher.fetch(url)
        fetched.release()
        return fetched

    async def decode(self, fetched: Fetched, row: RowInput = NO_ROW) -> ProcessedImage:
        """Decode and resize in threads; the body's bytes are given back at the end.

        The header is read first (``open_image``), then the pixels its decode needs are
        taken from the pixel budget; an image that needs more than the whole budget is
        refused as ``bomb``. The decode metric is the time spent in the two thread
        calls (queueing excluded)."""
        timer = _ThreadTimer()
        try:
            opened = await self._in_thread(timer, open_image, fetched.body, self._image, row)
            try:
                return await self._finish(opened, timer)
            finally:
                opened.close()
        finally:
            fetched.release()
            if timer.calls:
                self._metrics.decode_seconds.observe(timer.seconds)

    async def _finish(self, opened: OpenedImage, timer: _ThreadTimer) -> ProcessedImage:
        if opened.cost > self._pixels.total:
            raise ImageRejected(Outcome.BOMB, f"decoding needs {opened.cost >> 20} MB, over "
                                              f"the {self._pixels.total >> 20} MB for pixels")
        async with self._pixels.hold(opened.cost):
            return await self._in_thread(timer, finish_image, opened)

    async def _in_thread(self, timer: _ThreadTimer, func: Callable[..., _T],
                         *args: object) -> _T:
        return await trio.to_thread.run_sync(timer.run, func, *args, limiter=self._decoders)

    async def one(self, index: int, candidate: Candidate) -> Sample:
        """The candidate's sample: its origin's robots.txt asked first (when the network
        has a ``RobotsCache``), then fetched, decoded and resized."""
        try:
            if self._robots is not None:
                await self._robots.check(candidate.url)
            row = row_input(candidate, self._image)
            image = await self.decode(await self._fetcher.fetch(candidate.url), row)
        except FetchFailure as exc:
            return Sample(index=index, candidate=candidate, outcome=exc.outcome,
                          detail=exc.detail)
        return Sample(index=index, candidate=candidate, outcome=Outcome.OK, image=image)


class _ThreadTimer:
    """Wall-clock seconds of the calls it runs (in the decode thread), summed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def run(self, func: Callable[..., _T], *args: object) -> _T:
        start = time.perf_counter()
        self.calls += 1
        try:
            return func(*args)
        finally:
            self.seconds += time.perf_counter() - start
