"""Download one batch into one shard: the worker's pipeline.

Stages, each owning and closing its channel ends::

    feeder --(index, candidate)--> N fetch tasks --Sample--> writer --> ShardWriter
                                     |  fetch (Trio + httpx, guarded)
                                     |  decode + resize (thread, CapacityLimiter)

``download_batch`` returns a ``PreparedShard`` whose files are still under temporary
names; ``commit`` renames them and writes the stats json, ``abort`` deletes them. The
run loop checks that it still holds the lease between the two.

Resource handling: the httpx client, the DNS cache and the host gate live for one
batch. Bodies waiting for a decode thread are bounded by a ``ByteBudget``; decoding
runs in at most ``decode_threads`` threads at once. On any error or cancellation the
temporary files are removed. The ``WorkerMetrics`` passed in (``worker.metrics``)
see every fetch and decode, and every written sample's outcome.

Error handling: each candidate's failure is a ``FetchFailure`` turned into its
``Sample`` outcome; anything else (a storage error, a bug) fails the whole batch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import fsspec
import trio

from pairfarm.outcomes import Outcome
from pairfarm.protocol import Candidate, ShardFiles
from worker.budget import ByteBudget
from worker.errors import FetchFailure
from worker.fetcher import Fetched, Fetcher
from worker.hosts import HostGate
from worker.imaging import ProcessedImage, process_image
from worker.metrics import WorkerMetrics, build_metrics
from worker.network import Dialer, GuardedBackend, TrioDialer
from worker.resolver import CachingResolver, Resolver, SystemResolver
from worker.settings import PipelineSettings
from worker.shards import Sample, ShardStats, ShardWriter
from worker.transport import build_client

_DECODE_BUDGET = 96 * 1024 * 1024
_WRITE_GROUP = 63


@dataclass(frozen=True, kw_only=True)
class Network:
    """How the pipeline reaches the web: the resolver and the dialer (tests swap them)."""

    resolver: Resolver = field(default_factory=SystemResolver)
    dialer: Dialer = field(default_factory=TrioDialer)


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

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.writer.abort)


OnSample = Callable[[Sample], None]


async def download_batch(batch_id: int, candidates: Sequence[Candidate], *,
                         settings: PipelineSettings, fs: fsspec.AbstractFileSystem,
                         directory: str, network: Network | None = None,
                         on_sample: OnSample | None = None,
                         metrics: WorkerMetrics | None = None) -> PreparedShard:
    """Fetch and process every candidate; every one ends in exactly one ``Sample``.

    ``metrics`` (a fresh registry by default) records fetches, decodes and outcomes."""
    net = network or Network()
    writer = await trio.to_thread.run_sync(
        lambda: ShardWriter(fs, directory, batch_id, image_ext=settings.image.output_format))
    start = time.time()
    recorder = _Recorder(metrics or build_metrics(), on_sample or _ignore)
    try:
        wire = await _run(candidates, settings, net, writer, recorder)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(writer.abort)
        raise
    stats = ShardStats(start_time=start, end_time=time.time(), bytes_downloaded=wire)
    return PreparedShard(writer=writer, stats=stats, outcomes=writer.outcome_counts())


def _ignore(sample: Sample) -> None:
    return None


@dataclass(frozen=True)
class _Recorder:
    """What happens to a written sample: its outcome counted, then ``on_sample``."""

    metrics: WorkerMetrics
    on_sample: OnSample

    def __call__(self, sample: Sample) -> None:
        self.metrics.outcome(sample.outcome.value)
        self.on_sample(sample)


@asynccontextmanager
async def open_stage(settings: PipelineSettings, network: Network,
                     metrics: WorkerMetrics | None = None) -> AsyncIterator[Stage]:
    """A ``Stage`` with a fresh client, DNS cache and host gate; closed on exit."""
    backend = GuardedBackend(CachingResolver(network.resolver), settings.fetch.policy,
                             network.dialer)
    recorded = metrics or build_metrics()
    async with build_client(settings.fetch, backend) as client:
        gate = HostGate(per_host=settings.fetch.per_host,
                        max_delay=settings.fetch.max_retry_after)
        fetcher = Fetcher(settings.fetch, client, gate, recorded)
        yield Stage(fetcher, settings, recorded)


async def _run(candidates: Sequence[Candidate], settings: PipelineSettings, net: Network,
               writer: ShardWriter, recorder: _Recorder) -> int:
    async with open_stage(settings, net, recorder.metrics) as stage:
        jobs_send, jobs_recv = trio.open_memory_channel[tuple[int, Candidate]](0)
        done_send, done_recv = trio.open_memory_channel[Sample](64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, candidates, jobs_send)
            async with done_send, jobs_recv:
                for _ in range(min(settings.fetch.concurrency, max(1, len(candidates)))):
                    nursery.start_soon(stage.work, jobs_recv.clone(), done_send.clone())
            nursery.start_soon(_write, done_recv, writer, recorder)
        return stage.wire_bytes


async def _feed(candidates: Sequence[Candidate],
                send: trio.MemorySendChannel[tuple[int, Candidate]]) -> None:
    async with send:
        for item in enumerate(candidates):
            await send.send(item)


async def _write(recv: trio.MemoryReceiveChannel[Sample], writer: ShardWriter,
                 on_sample: OnSample) -> None:
    """Write samples as they come; whatever is already queued goes in one thread call."""
    async with recv:
        async for sample in recv:
            samples = [sample, *_queued(recv, limit=_WRITE_GROUP)]
            await trio.to_thread.run_sync(_add_all, writer, samples)
            for done in samples:
                on_sample(done)


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
    """Fetch + decode of a candidate; ``work`` runs it over a channel, one per task."""

    def __init__(self, fetcher: Fetcher, settings: PipelineSettings,
                 metrics: WorkerMetrics | None = None) -> None:
        self._fetcher = fetcher
        self._image = settings.image
        self._decoders = trio.CapacityLimiter(settings.decode_threads)
        self._budget = ByteBudget(_DECODE_BUDGET)
        self._metrics = metrics or build_metrics()

    @property
    def wire_bytes(self) -> int:
        return self._fetcher.wire_bytes

    async def work(self, jobs: trio.MemoryReceiveChannel[tuple[int, Candidate]],
                   done: trio.MemorySendChannel[Sample]) -> None:
        async with jobs, done:
            async for index, candidate in jobs:
                await done.send(await self.one(index, candidate))

    async def fetch(self, url: str) -> Fetched:
        return await self._fetcher.fetch(url)

    async def decode(self, fetched: Fetched) -> ProcessedImage:
        """Decode and resize in a thread; bodies waiting for a thread share a byte budget."""
        async with self._budget.hold(len(fetched.body)):
            return await trio.to_thread.run_sync(self._timed_decode, fetched.body,
                                                 limiter=self._decoders)

    def _timed_decode(self, body: bytes) -> ProcessedImage:
        """``process_image`` in the decode thread, timed there (queueing excluded)."""
        with self._metrics.decoding():
            return process_image(body, self._image)

    async def one(self, index: int, candidate: Candidate) -> Sample:
        try:
            image = await self.decode(await self.fetch(candidate.url))
        except FetchFailure as exc:
            return Sample(index=index, candidate=candidate, outcome=exc.outcome,
                          detail=exc.detail)
        return Sample(index=index, candidate=candidate, outcome=Outcome.OK, image=image)
