"""Ingest files, each in its own transaction, one after another or ``jobs`` at once,
with a progress bar.

Within a file, one worker thread reads, validates, hashes and encodes the next chunk (and
takes its block of ids) while the server copies the current one (``prefetched``): Arrow,
hashlib and psycopg release the GIL, so the Python side runs on the other core beside the
server's work instead of adding to it.

With ``jobs`` > 1, that many threads take the next file from the list as each finishes,
each on its own connections: several backends load at once, which uses more cores on
the server's side when its CPU per row is the bound (it grows with ``url_hashes``, see
BENCHMARKS.md). Each file is still one transaction. The dedup stays exact: a hash
another file's open transaction inserted makes the second one wait for its commit (then
it is a duplicate) or rollback. Two files can each wait for a hash the other inserted;
PostgreSQL then aborts one (a deadlock's victim), which loads nothing and is loaded again
from its start (``DEADLOCK_ATTEMPTS``). Between files loaded at once, the first to insert
a URL's hash wins, not necessarily the earlier file of the list.

Resource handling: two psycopg connections per job (the files' transactions, and the id
blocks'), closed when the job ends; one more for the final ANALYZE; the rejects file (if
asked for) is closed at the end, each file's rejected rows spooled to a temporary file
until the file ends; the prefetch thread is joined when the file ends or fails (after the
chunk it is preparing). Error handling: the first malformed file stops the run with
``IngestError`` (files before it, and files that other jobs were loading meanwhile, stay
loaded; it loads nothing); an interrupt cancels the statements of every job (their files
load nothing).
"""

from __future__ import annotations

import csv
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import psycopg
from psycopg import errors
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from coordinator.db import raw_connection
from coordinator.errors import IngestError
from coordinator.ingest.ids import IdBlocks
from coordinator.ingest.loader import FileLoader, FileSummary, Prepared, PreparedRun, run_of
from coordinator.ingest.reader import InputFile, detect, read_batches
from coordinator.ingest.validate import Columns, Validated, validate
from coordinator.ingest.waves import WAVE_SIZE, WaveCatalog, probe_on
from coordinator.queries import Q

log = logging.getLogger(__name__)

REJECT_FIELDS = ("file", "row", "reason", "url")
#: the rows whose URL hashes go to the server in one sorted COPY (at least; whole chunks).
#: Longer runs put more of them on each leaf of url_hashes' primary key (1M-row runs: 23 %
#: less backend CPU per row at 8-10M rows, bench/ingest_growth.py), but a run is prepared
#: whole before the server gets any of it: with 1M-row files and one job, 1M-row runs
#: left one core idle (101-147k rows/s against 157-208k with one chunk a run; BENCHMARKS.md)
RUN_ROWS = 131_072
#: a file whose transaction PostgreSQL chose as a deadlock's victim is loaded again from
#: its start, up to this many attempts in all
DEADLOCK_ATTEMPTS = 5
_END = object()
T = TypeVar("T")


def ingest(database_url: str, paths: Sequence[Path], columns: Columns, *,
           fmt: str | None = None, rejects: Path | None = None,
           progress: Progress | None = None, jobs: int = 1,
           wave_size: int = WAVE_SIZE) -> list[FileSummary]:
    """Load ``paths`` into the candidates table; one summary per file, in their order.

    ``jobs`` files load at once, each on its own connections (``_Jobs``); the dedup's
    current wave is frozen once it holds ``wave_size`` hashes
    (``coordinator.ingest.waves``)."""
    if jobs < 1:
        raise IngestError(f"jobs must be at least 1, not {jobs}")
    if wave_size < 1:
        raise IngestError(f"a wave holds at least 1 hash, not {wave_size}")
    sources = [detect(p, fmt) for p in paths]
    with _rejects_writer(rejects) as writer:
        run = _Run(database_url, columns, _Rejects(writer), progress,
                   WaveCatalog(wave_size))
        summaries = run.all(sources, jobs)
        with _connect(database_url) as conn:
            conn.execute(Q.sql("ingest_analyze"))
    return summaries


@dataclass
class _Run:
    """What every file of one ``ingest`` call shares."""

    database_url: str
    columns: Columns
    rejects: _Rejects
    progress: Progress | None
    waves: WaveCatalog

    def all(self, sources: Sequence[InputFile], jobs: int) -> list[FileSummary]:
        """Each file's summary, in order; the first file that fails (in the files'
        order) raises once every job has stopped."""
        todo: queue.SimpleQueue[tuple[int, InputFile]] = queue.SimpleQueue()
        for item in enumerate(sources):
            todo.put(item)
        state = _Jobs([None] * len(sources))
        if jobs == 1 or len(sources) == 1:
            self.job(todo, state)
        else:
            state.run_threads(min(jobs, len(sources)), lambda: self.job(todo, state))
        return state.result()

    def job(self, todo: queue.SimpleQueue[tuple[int, InputFile]], state: _Jobs) -> None:
        """Load files from ``todo`` on a connection pair of this job until none is left or
        a file failed."""
        try:
            with _connect(self.database_url) as conn, _connect(self.database_url) as id_conn:
                state.opened(conn)
                ids = IdBlocks(id_conn)
                while not state.stop.is_set():
                    try:
                        index, source = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        state.summaries[index] = self.file(conn, ids, source)
                    except Exception as exc:
                        state.failed(index, exc)
        except Exception as exc:  # connecting
            state.failed(-1, exc)

    def file(self, conn: psycopg.Connection, ids: IdBlocks,
             source: InputFile) -> FileSummary:
        """One file in one transaction; loaded again from its start when PostgreSQL
        chose it as a deadlock's victim."""
        task = self.progress.add_task(source.path.name, total=None) if self.progress else None
        try:
            for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
                with self.rejects.spool() as spool:
                    try:
                        summary = _ingest_file(conn, ids, self.waves, source,
                                               self.columns, writer=spool.writer,
                                               progress=self.progress, task=task)
                        _freeze_if_full(conn, self.waves)
                        return summary
                    except _Deadlock:
                        if attempt == DEADLOCK_ATTEMPTS:
                            raise
                        spool.discard()
                        if self.progress is not None and task is not None:
                            self.progress.reset(task)
            raise AssertionError("unreachable")
        except _Deadlock as exc:
            raise IngestError(f"{source.name}: chosen as a deadlock's victim "
                              f"{DEADLOCK_ATTEMPTS} times with concurrent ingests: "
                              f"{exc.cause} (nothing of this file was loaded)") from exc
        finally:
            if self.progress is not None and task is not None:
                self.progress.stop_task(task)


class _Deadlock(IngestError):
    """The file's transaction was a deadlock's victim (two ingests, each waiting for a
    URL hash the other inserted); nothing of the file was loaded."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass
class _Jobs:
    """The summaries and the first failure of the jobs of one run; the connections in
    use, to cancel their statements when the run is interrupted."""

    summaries: list[FileSummary | None]
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[tuple[int, Exception]] = field(default_factory=list)
    connections: list[psycopg.Connection] = field(default_factory=list)

    def opened(self, conn: psycopg.Connection) -> None:
        self.connections.append(conn)

    def failed(self, index: int, exc: Exception) -> None:
        self.errors.append((index, exc))
        self.stop.set()

    def run_threads(self, count: int, target: Callable[[], None]) -> None:
        threads = [threading.Thread(target=target, name=f"ingest-job-{i}")
                   for i in range(count)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:
            self.stop.set()  # Ctrl-C: the files in flight fail, loading nothing
            for conn in list(self.connections):
                conn.cancel_safe()
            for thread in threads:
                thread.join()
            raise

    def result(self) -> list[FileSummary]:
        if self.errors:
            raise min(self.errors, key=lambda e: e[0] if e[0] >= 0 else len(self.summaries))[1]
        assert all(s is not None for s in self.summaries)
        return cast(list[FileSummary], self.summaries)


def _freeze_if_full(conn: psycopg.Connection, waves: WaveCatalog) -> None:
    """Freeze the dedup's current wave if it is full. A failed freeze changes nothing
    (one transaction) and the dedup stays exact (the current wave grows on): logged, and
    the next file's end tries again."""
    try:
        frozen = waves.freeze_if_full(conn)
    except psycopg.Error as exc:
        log.warning("the dedup's current wave could not be frozen (the next file's end "
                    "tries again): %s", str(exc).strip())
        return
    if frozen is not None:
        log.info("froze the dedup's wave %d (%d hashes): %.1f s waiting for the files "
                 "in flight, then new files held off %.1f s", frozen.wave, frozen.hashes,
                 frozen.waited_s, frozen.locked_s)


def _ingest_file(conn: psycopg.Connection, ids: IdBlocks, waves: WaveCatalog,
                 source: InputFile, columns: Columns, *, writer: Any,
                 progress: Progress | None, task: TaskID | None) -> FileSummary:
    try:
        with conn.transaction():
            frozen = waves.enter(conn, probe_on(ids.conn))
            loader = FileLoader(conn, source, ids.reserve, frozen)
            with closing(prefetched(_prepared(loader, source, columns))) as runs:
                for checked, run in runs:
                    loader.write(run)
                    for part in checked:
                        _write_rejects(writer, source, part)
                    if progress is not None and task is not None:
                        progress.update(task, advance=sum(c.read for c in run.chunks))
            return loader.finish()
    except IngestError as exc:
        message = str(exc)
        prefix = "" if message.startswith(source.name) else f"{source.name}: "
        raise IngestError(f"{prefix}{message} (nothing of this file was loaded)") from exc
    except errors.DeadlockDetected as exc:
        raise _Deadlock(str(exc).strip()) from exc
    except psycopg.Error as exc:
        raise IngestError(f"{source.name}: the database refused the data: "
                          f"{str(exc).strip()} (nothing of this file was loaded)") from exc


def _prepared(loader: FileLoader, source: InputFile, columns: Columns
              ) -> Generator[tuple[list[Validated], PreparedRun], None, None]:
    """The file's chunks, validated and prepared for COPY (no transaction), in runs of
    at least ``RUN_ROWS`` rows (the last may be shorter)."""
    row = 1
    checked: list[Validated] = []
    chunks: list[Prepared] = []
    seen: set[bytes] = set()
    for batch in read_batches(source, columns.text_columns()):
        checked.append(validate(batch, columns, row))
        chunks.append(loader.prepare(checked[-1], batch.num_rows, seen))
        row += batch.num_rows
        if sum(c.count for c in chunks) >= RUN_ROWS:
            yield checked, run_of(chunks)
            checked, chunks, seen = [], [], set()
    if chunks:
        yield checked, run_of(chunks)


def prefetched(items: Generator[T, None, None]) -> Generator[T, None, None]:
    """``items``, each computed in a worker thread while the caller handles the one
    before; an exception raised by ``items`` is raised here, in order. Closing this
    generator waits for the item being computed, then closes ``items``."""
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="ingest-prepare") as pool:
            ahead = pool.submit(next, items, _END)
            while (item := ahead.result()) is not _END:
                ahead = pool.submit(next, items, _END)
                yield cast(T, item)
    finally:
        items.close()


@contextmanager
def _connect(database_url: str) -> Iterator[psycopg.Connection]:
    with raw_connection(database_url) as conn:
        conn.execute(Q.sql("ingest_session"))
        yield conn


@contextmanager
def _rejects_writer(path: Path | None) -> Iterator[Any]:
    if path is None:
        yield None
        return
    handle: IO[str]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECT_FIELDS)
        yield writer


class _Rejects:
    """The run's rejects CSV (or none), shared by its jobs: each file's rejected rows are
    spooled to a temporary file and appended whole, under a lock, when the file ends
    (loaded or failed); a deadlock's victim discards its spool and starts again."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self._lock = threading.Lock()

    @contextmanager
    def spool(self) -> Iterator[_Spool]:
        if self._writer is None:
            yield _Spool(None)
            return
        with tempfile.TemporaryFile("w+", newline="", encoding="utf-8") as handle:
            spool = _Spool(handle)
            try:
                yield spool
            finally:
                if not spool.discarded:
                    handle.seek(0)
                    with self._lock:
                        self._writer.writerows(csv.reader(handle))


class _Spool:
    def __init__(self, handle: IO[str] | None) -> None:
        self.handle = handle
        self.writer = csv.writer(handle) if handle is not None else None
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


def _write_rejects(writer: Any, source: InputFile, checked: Validated) -> None:
    if writer is None or checked.rejects.num_rows == 0:
        return
    for r in checked.rejects.to_pylist():
        writer.writerow((source.name, r["row"], r["reason"], r["url"]))


def make_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn(),
                    transient=False)


def print_summary(console: Console, summaries: Sequence[FileSummary]) -> None:
    """One table row per file plus the total, then a one-line total."""
    total = FileSummary(source="total")
    for s in summaries:
        total.add(s)
    table = Table("file", "read", "inserted", "duplicate", "rejected", "by reason",
                  title="ingest summary")
    for s in [*summaries, total]:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s.rejected.items()))
        table.add_row(Path(s.source).name, str(s.read), str(s.inserted), str(s.duplicates),
                      str(sum(s.rejected.values())), reasons or "-")
    console.print(table)
    console.print(f"read {total.read}, inserted {total.inserted}, duplicate "
                  f"{total.duplicates}, rejected {sum(total.rejected.values())}"
                  + "".join(f", {r} {n}" for r, n in sorted(total.rejected.items())))
