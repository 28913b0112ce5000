"""A run: WAT files in parallel on all cores, dedup, shards, a progress bar and a summary.

Files are parsed by a pool of worker processes (spawned, one language model each);
results are taken back in input order, so the first occurrence of a duplicate in input
order is the one kept and the same inputs give the same shards. At most ``2 x workers``
files are in flight, which bounds the memory held by finished results waiting their turn.

The runner owns the run-wide state: the exact key set, the Bloom filter, the shard writer
and the counts. ``{run_id}_failed.txt`` lists the sources that failed (a ``--from-list``
for a rerun); the summary json ``{run_id}_summary.json`` is the last file written.

Resource handling: the process pool, the shard writer and the progress bar are context
managers closed on every exit; the Bloom filter is saved in a ``finally`` so it always
matches the shards that were published.

Error handling: a file's ``SourceError`` arrives in its ``FileResult``; an unexpected
exception in a worker, or a worker process that died, is turned into a failure of that
file here (logged with its traceback). A failed ``pairfarm ingest`` of a shard is recorded
and the run goes on; the shard stays on disk for a later ``pairfarm ingest``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from extract.counters import FileCounts, FileFailure, RunCounts
from extract.dedup import BloomStore, RunDedup
from extract.errors import IngestError
from extract.fileworker import FileResult, FileSettings, init_process, process_file
from extract.links import Drop
from extract.settings import ExtractSettings
from extract.shards import SCHEMA, ShardWriter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunResult:
    run_id: str
    counts: RunCounts
    shards: list[Path]
    summary_path: Path
    elapsed_s: float
    bloom: dict[str, Any] | None
    ingest_failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.counts.failures and not self.ingest_failures


def run_extract(settings: ExtractSettings, console: Console | None = None) -> RunResult:
    """Extract every source into shards under ``settings.out_dir``; never raises for a file."""
    console = console or Console(stderr=True)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    if settings.ingest is not None:
        settings.ingest.check_available()
    run_id = new_run_id(settings.out_dir)
    bloom = BloomStore.open(settings.bloom_path, settings.bloom) if settings.bloom_path else None
    state = _RunState(RunCounts(), RunDedup(), bloom)
    ingest_failures: list[str] = []
    started = time.monotonic()
    try:
        writer = ShardWriter(settings.out_dir, run_id, settings.rows_per_shard,
                             _ingest_hook(settings, ingest_failures))
        with writer, _progress(console) as progress:
            task = progress.add_task("extract", total=len(settings.sources), kept=0, records=0)
            for result in iter_results(settings):
                writer.write(state.absorb(result))
                progress.update(task, advance=1, kept=state.counts.kept,
                                records=state.counts.records)
    finally:
        if bloom is not None:
            bloom.save()
    elapsed = time.monotonic() - started
    run = RunResult(run_id, state.counts, writer.shards,
                    settings.out_dir / f"{run_id}_summary.json", elapsed,
                    bloom.report() if bloom else None, ingest_failures)
    write_failed_list(run)
    write_summary(run, settings)
    return run


@dataclass(slots=True)
class _RunState:
    counts: RunCounts
    dedup: RunDedup
    bloom: BloomStore | None

    def absorb(self, result: FileResult) -> pa.Table:
        """Count a file's result and return its rows that survive the run-wide dedup."""
        self.counts.add_file(result.counts)
        if result.error is not None:
            self.counts.failures.append(FileFailure(result.source, result.error))
        mask = [self._keep(key) for key in result.keys]
        kept = result.table.filter(pa.array(mask, type=pa.bool_())) if result.keys else \
            result.table
        self.counts.kept += kept.num_rows
        self._count_languages(kept)
        return kept

    def _keep(self, key: int) -> bool:
        if not self.dedup.first_time(key):
            self.counts.dropped[Drop.DUP_IN_RUN] += 1
            return False
        if self.bloom is not None and self.bloom.seen_before(key):
            self.counts.dropped[Drop.DUP_EARLIER_RUN] += 1
            return False
        return True

    def _count_languages(self, table: pa.Table) -> None:
        if table.num_rows:
            for item in pc.value_counts(table["language"]).to_pylist():
                self.counts.languages[item["values"]] += item["counts"]


def iter_results(settings: ExtractSettings) -> Iterator[FileResult]:
    """The ``FileResult`` of every source, in input order, from a pool of processes."""
    context = multiprocessing.get_context("spawn")
    sources = iter(settings.sources)
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=init_process,
                             initargs=(settings.file.language_threshold,)) as pool:
        pending = deque(_submit(pool, s, settings.file)
                        for s in islice(sources, 2 * settings.workers))
        try:
            while pending:
                source, future = pending.popleft()
                yield _result_of(source, future)
                pending.extend(_submit(pool, s, settings.file) for s in islice(sources, 1))
        finally:  # an interrupted run does not wait for files nobody will read
            pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ProcessPoolExecutor, source: str,
            settings: FileSettings) -> tuple[str, Future[FileResult]]:
    try:
        return source, pool.submit(process_file, source, settings)
    except BrokenProcessPool as exc:
        failed: Future[FileResult] = Future()
        failed.set_exception(exc)
        return source, failed


def _result_of(source: str, future: Future[FileResult]) -> FileResult:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        log.error("%s: a worker process died: %s", source, exc)
        return _failed(source, f"a worker process died: {exc}")
    except Exception as exc:  # the per-file boundary: a bug in one file never ends the run
        log.exception("%s: unexpected error", source)
        return _failed(source, f"unexpected {type(exc).__name__}: {exc}")


def _failed(source: str, error: str) -> FileResult:
    return FileResult(source, FileCounts(), SCHEMA.empty_table(), [], error)


def _ingest_hook(settings: ExtractSettings, failures: list[str]) -> Any:
    command = settings.ingest
    if command is None:
        return None

    def ingest(shard: Path) -> None:
        try:
            command.run(shard)
        except IngestError as exc:
            log.error("%s", exc)
            failures.append(str(exc))

    return ingest


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("files  {task.fields[records]:,} records  {task.fields[kept]:,} kept"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def new_run_id(out_dir: Path) -> str:
    """The UTC start time to the millisecond (runs sort by name in start order)."""
    now = datetime.now(UTC)
    stamp = f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}"
    run_id, n = f"{stamp}Z", 1
    while any(out_dir.glob(f"{run_id}[-_]*")):
        n += 1
        run_id = f"{stamp}Z{n}"
    return run_id


def summary_dict(result: RunResult, settings: ExtractSettings) -> dict[str, Any]:
    counts = result.counts
    per_s = result.elapsed_s or 1e-9
    return {
        "run_id": result.run_id,
        **counts.as_dict(),
        "shards": [p.name for p in result.shards],
        "elapsed_s": round(result.elapsed_s, 3),
        "workers": settings.workers,
        "records_per_s": round(counts.records / per_s, 1),
        "candidates_per_s": round(counts.kept / per_s, 1),
        "language_threshold": settings.file.language_threshold,
        "min_alt_chars": settings.file.min_alt_chars,
        "dedup_key": str(settings.file.key_mode),
        "bloom": result.bloom,
        "ingested": settings.ingest is not None,
        "ingest_failures": result.ingest_failures,
    }


def failed_list_path(result: RunResult) -> Path:
    return result.summary_path.with_name(f"{result.run_id}_failed.txt")


def write_failed_list(result: RunResult) -> None:
    """The failed sources, one per line, for ``--from-list`` (only when some failed).

    Rerunning them is safe: the Bloom filter drops what the partial read already kept.
    """
    if result.counts.failures:
        lines = "".join(f"{failure.source}\n" for failure in result.counts.failures)
        failed_list_path(result).write_text(lines)


def write_summary(result: RunResult, settings: ExtractSettings) -> None:
    tmp = result.summary_path.with_name(result.summary_path.name + ".tmp")
    tmp.write_text(json.dumps(summary_dict(result, settings), indent=1, ensure_ascii=False))
    tmp.replace(result.summary_path)
