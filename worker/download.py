"""``pairfarm download``: URL lists into shards without a coordinator, img2dataset's path.

The shards are the farm's (``worker.batch.download_batch``, the same pipeline and shard
writer as ``pairfarm worker``), numbered as ``worker.inputs.shards_of_files`` cuts the
inputs, in the layout asked for (``worker.layouts``).

Resume (img2dataset's ``incremental`` mode, the default): a shard whose stats json exists
is done (the json is written last) and is skipped; any other shard is downloaded again
from its first row, and its files replace what an interrupted run left; the hidden
temporary files such a run left are removed first. So after a kill -9 and a rerun every
input row is in exactly one finished shard. ``overwrite`` starts the folder afresh as
img2dataset's does (it deletes the whole folder): every shard file of an earlier run is
removed first (only those: ``N.tar``, ``N.parquet``, ``N_stats.json``, ``N/``; other files
stay), so no shard of an earlier, longer list survives, then every shard is downloaded.
One ``pairfarm download`` per output folder at a time.

``processes`` > 1 runs the shards in that many processes (``spawn``), each shard in one
task of the pool, so no shard is done twice; at most twice as many shards as processes
are read ahead. Each process has its own Trio loop, connection pools and budgets
(``--concurrency`` and the memory budgets are per process, as img2dataset's
``thread_count``); the parent counts their outcomes, bytes and shards in its metrics.

Error handling: a shard that cannot be written (``ShardWriteError``) stops the run with
its message; the shards finished before it stay finished.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import fsspec
import trio

from worker.batch import Network, download_batch
from worker.inputs import Columns, Shard, input_files, shards_of_files
from worker.metrics import BatchResult, WorkerMetrics, build_metrics
from worker.resolver import SystemResolver
from worker.robotstxt import RobotsCache
from worker.settings import PipelineSettings

_DONE = re.compile(r"^(\d+)_stats\.json$")
#: what a shard of ``pairfarm download`` is made of, in any layout
_SHARD_FILE = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)?$")
_TEMPORARY = ".tmp-"


@dataclass(frozen=True, kw_only=True)
class DownloadPlan:
    """What ``pairfarm download`` was asked to do."""

    sources: tuple[str, ...]
    input_format: str | None = None
    columns: Columns = field(default_factory=Columns)
    shard_size: int = 10_000
    output: str = "./shards"
    layout: str = "webdataset"
    incremental: bool = True
    processes: int = 1


@dataclass
class Totals:
    """What a run did: outcomes of the shards it wrote, shards skipped as done."""

    outcomes: Counter[str] = field(default_factory=Counter)
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    @property
    def urls(self) -> int:
        return sum(self.outcomes.values())


@dataclass(frozen=True)
class Recorder:
    """Where a finished shard is counted: metrics, progress, totals."""

    metrics: WorkerMetrics
    on_sample: Callable[[object], None]
    totals: Totals

    def shard(self, outcomes: Counter[str]) -> None:
        self.metrics.batch(BatchResult.COMPLETED)
        self.totals.outcomes.update(outcomes)
        self.totals.shards_written += 1

    def from_pool(self, result: ShardResult) -> None:
        """A shard another process wrote: its outcomes and bytes into these metrics."""
        for outcome, count in result.outcomes.items():
            self.metrics.outcomes.labels(outcome=outcome).inc(count)
            for _ in range(count):
                self.on_sample(None)
        self.metrics.add_bytes(result.bytes_downloaded)
        self.shard(Counter(result.outcomes))


@dataclass(frozen=True)
class ShardResult:
    number: int
    outcomes: dict[str, int]
    bytes_downloaded: int


def storage(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, _, paths = fsspec.get_fs_token_paths(output)
    return fs, paths[0]


def done_shards(fs: fsspec.AbstractFileSystem, directory: str) -> set[int]:
    """The shards whose stats json exists."""
    if not fs.exists(directory):
        return set()
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(directory, detail=False))
    return {int(m.group(1)) for m in map(_DONE.match, names) if m}


def clear_shards(fs: fsspec.AbstractFileSystem, directory: str) -> int:
    """Remove every shard file and folder of an earlier run (``overwrite``)."""
    if not fs.exists(directory):
        return 0
    found = [path for path in fs.ls(directory, detail=False)
             if _SHARD_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])]
    for path in found:
        fs.rm(path, recursive=True)
    return len(found)


def clear_leftovers(fs: fsspec.AbstractFileSystem, directory: str) -> int:
    """Remove the hidden temporary files and folders an interrupted run left."""
    if not fs.exists(directory):
        return 0
    leftovers = [path for path in fs.ls(directory, detail=False)
                 if path.rstrip("/").rsplit("/", 1)[-1].startswith(".")
                 and _TEMPORARY in path.rsplit("/", 1)[-1]]
    for path in leftovers:
        fs.rm(path, recursive=True)
    return len(leftovers)


def local_network(settings: PipelineSettings) -> Network:
    """The system resolver and, with ``--robots``, this process's own robots.txt cache."""
    robots = (RobotsCache(settings.robots, settings.fetch.agent_token, None)
              if settings.robots.enabled else None)
    return Network(resolver=SystemResolver(timeout=settings.fetch.dns_timeout), robots=robots)


def pending(plan: DownloadPlan, fs: fsspec.AbstractFileSystem, directory: str,
            totals: Totals) -> Iterator[Shard]:
    """The shards still to download (those done are counted in ``totals``)."""
    done = done_shards(fs, directory) if plan.incremental else set()
    files = input_files(list(plan.sources), plan.input_format)
    for shard in shards_of_files(files, plan.columns, plan.shard_size):
        if shard.number in done:
            totals.shards_skipped += 1
        else:
            yield shard


def run(plan: DownloadPlan, settings: PipelineSettings, metrics: WorkerMetrics,
        on_sample: Callable[[object], None]) -> Totals:
    """Download every pending shard of ``plan``; blocking."""
    fs, directory = storage(plan.output)
    fs.makedirs(directory, exist_ok=True)
    clear_leftovers(fs, directory)
    if not plan.incremental:
        clear_shards(fs, directory)
    totals = Totals()
    start = time.monotonic()
    shards = pending(plan, fs, directory, totals)
    recorder = Recorder(metrics, on_sample, totals)
    if plan.processes == 1:
        trio.run(_here, plan, shards, settings, recorder)
    else:
        _in_pool(plan, shards, settings, recorder.from_pool)
    totals.seconds = time.monotonic() - start
    return totals


async def _here(plan: DownloadPlan, shards: Iterable[Shard], settings: PipelineSettings,
                recorder: Recorder) -> None:
    fs, directory = storage(plan.output)
    network = local_network(settings)
    for shard in shards:
        prepared = await download_batch(shard.number, shard.candidates, settings=settings,
                                        fs=fs, directory=directory, network=network,
                                        on_sample=recorder.on_sample,
                                        metrics=recorder.metrics, layout=plan.layout)
        await prepared.publish()
        recorder.shard(prepared.outcomes)


def _in_pool(plan: DownloadPlan, shards: Iterable[Shard], settings: PipelineSettings,
             record: Callable[[ShardResult], None]) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(plan.processes, mp_context=context) as pool:
        running: set[Future[ShardResult]] = set()
        for shard in shards:
            if len(running) >= 2 * plan.processes:
                running = _collect(running, record, FIRST_COMPLETED)
            running.add(pool.submit(download_shard, plan, settings, shard))
        _collect(running, record, "ALL_COMPLETED")


def _collect(running: set[Future[ShardResult]], record: Callable[[ShardResult], None],
             when: str) -> set[Future[ShardResult]]:
    done, still = wait(running, return_when=when)
    for future in done:
        record(future.result())  # a shard's error stops the run here
    return still


def download_shard(plan: DownloadPlan, settings: PipelineSettings, shard: Shard
                   ) -> ShardResult:
    """One shard, in a pool process: its own Trio loop, network and metrics."""
    return trio.run(_one_shard, plan, settings, shard)


async def _one_shard(plan: DownloadPlan, settings: PipelineSettings, shard: Shard
                     ) -> ShardResult:
    fs, directory = storage(plan.output)
    prepared = await download_batch(shard.number, shard.candidates, settings=settings,
                                    fs=fs, directory=directory,
                                    network=local_network(settings), metrics=build_metrics(),
                                    layout=plan.layout)
    await prepared.publish()
    return ShardResult(shard.number, dict(prepared.outcomes),
                       prepared.stats.bytes_downloaded)
