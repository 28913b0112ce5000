"""The bounded hot set (egress): finished batches leave the database for parquet files.

A batch that is ``done`` or ``failed`` (or ``downloaded``, with ``downloaded``: its final
state in a farm that runs no post-processing) and unchanged for ``min_age_s`` is archived:
``archive`` moves such batches, lowest id first, with their ``batch_members`` and
``candidates`` rows, out of the hot tables into parquet files in a folder (a local path or
an fsspec URL such as ``s3://bucket/archive``). A file holds one row per candidate: its id,
URL, caption, language, extra columns (JSON text) and ingest, beside its batch's final
state: batch id and status, the batch's outcome counts (JSON), its shard's files (JSON),
attempts, last error, kept, dropped, who downloaded it and when. The coordinator holds no
per-URL outcome (the worker writes it into the shard's own parquet, named by ``shard``), so
the file carries the per-batch counts the coordinator has.

One file is one transaction, whose commit is the point of truth:

1. ``pick_batches`` locks the next batches (``FOR UPDATE``: a concurrent requeue waits
   for the commit and then finds no batch; one that came first takes its batch out);
2. ``write_file`` copies their candidates batch by batch into the file and deletes their
   rows (the counts must match). The file is written under a temporary name (a local
   folder: ``NAME.tmp``, fsync, rename, fsync of the folder) or, on an object store,
   spooled locally and uploaded under its name (an object appears whole or not at all);
3. ``record_file`` records it (``archives``), adds the batches' figures to the archived
   totals (``archived_*``, which the stats add to the hot tables' own), and deletes the
   batches and their members.

A run that dies before its commit leaves every row in place and at most a file without a
record. Each run first removes every file in its folder that has an archive's name and no
record, then archives: the same batches again (under the same name when it picks the same
ones). So each archived candidate ends in exactly one recorded file and in no hot table.
One run at a time per database: a run holds a session advisory lock, which dies with its
connection. The dedup's waves (``url_hashes``, ``url_hashes_w<N>``) are never archived:
the dedup holds against archived URLs.

``AutoArchiver`` is the coordinator's automatic mode: a thread that archives whenever the
hot tables hold more than ``hot_max_candidates``.

Resource handling: one psycopg connection per run (autocommit, a transaction per file),
closed at its end; an object store's spool file is removed after the upload.
Error handling: folder errors (``OSError``, fsspec's) become ``ArchiveError``, and the
file's transaction rolls back; a database that cannot be reached is
``DatabaseUnavailable``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from coordinator.db import raw_connection
from coordinator.errors import ArchiveError, CoordinatorError
from coordinator.queries import Q
from coordinator.settings import ArchiveSettings

log = logging.getLogger(__name__)

#: names of archive files and of their temporary versions; only these are ever removed
ARCHIVE_NAME = re.compile(r"^batches-\d{12}-\d{12}\.parquet(\.tmp)?$")
TMP_SUFFIX = ".tmp"
ROW_GROUP_ROWS = 131_072
LOCK_POLL_S = 0.2
TIMESTAMP = pa.timestamp("us", tz="UTC")
#: the candidate's columns, in the order of ``archive_copy``'s CSV
CANDIDATE_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("candidate_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("language", pa.string()), ("extra", pa.string()), ("ingest_id", pa.int32()),
)
#: its batch's columns, in the order of ``archive_pick``'s row
BATCH_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("batch_id", pa.int64()), ("batch_status", pa.string()),
    ("batch_outcomes", pa.string()), ("shard", pa.string()), ("attempts", pa.int16()),
    ("pp_attempts", pa.int16()), ("last_error", pa.string()), ("kept", pa.int32()),
    ("dropped", pa.int32()), ("downloaded_by", pa.int32()), ("downloaded_at", TIMESTAMP),
    ("done_at", TIMESTAMP), ("updated_at", TIMESTAMP),
)
SCHEMA = pa.schema(CANDIDATE_COLUMNS + BATCH_COLUMNS)
CANDIDATE_SCHEMA = pa.schema(CANDIDATE_COLUMNS)


@dataclass(frozen=True)
class Batch:
    """A finished batch picked for a file: its id, size and the values of
    ``BATCH_COLUMNS`` (id and status first)."""

    id: int
    size: int
    status: str
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ArchivedFile:
    """One file a run wrote and recorded."""

    name: str
    first_batch_id: int
    last_batch_id: int
    batches: int
    candidates: int
    file_bytes: int


@dataclass(frozen=True)
class ArchiveRun:
    """What one run did: the files it recorded, the unrecorded files it removed, and the
    candidates in the hot tables before and after. ``skipped``: another run held the
    lock, nothing was done."""

    files: tuple[ArchivedFile, ...] = ()
    removed: tuple[str, ...] = ()
    hot_before: int = 0
    hot_after: int = 0
    skipped: bool = False

    @property
    def candidates(self) -> int:
        return sum(f.candidates for f in self.files)

    @property
    def batches(self) -> int:
        return sum(f.batches for f in self.files)


# -- the folder ---------------------------------------------------------------------------

class Folder:
    """An archive folder through fsspec: its archive files, removal, atomic publication."""

    def __init__(self, location: str) -> None:
        try:
            self.fs, self.path = fsspec.core.url_to_fs(location)
        except (ValueError, ImportError) as exc:
            raise ArchiveError(f"cannot use the archive location {location!r}: {exc}") from exc
        self.local = isinstance(self.fs, LocalFileSystem)
        #: how ``archives.directory`` names the folder
        self.directory = self.path if self.local else self.fs.unstrip_protocol(self.path)

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def names(self) -> list[str]:
        """The archive files (recorded or not) and temporary files in the folder."""
        with self._errors("list"):
            self.fs.makedirs(self.path, exist_ok=True)
            entries = self.fs.ls(self.path, detail=False)
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if ARCHIVE_NAME.match(n))

    def remove(self, name: str) -> None:
        with self._errors(f"remove {name} from"):
            self.fs.rm_file(self.join(name))

    @contextmanager
    def publish(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file that appears in the folder under ``name`` only once the block
        ends without an error, whole (fsync'd and renamed, or uploaded)."""
        with self._errors(f"write {name} in"):
            self.fs.makedirs(self.path, exist_ok=True)
            opened = self._publish_local(name) if self.local else self._publish_remote(name)
            with opened as out:
                yield out

    @contextmanager
    def _publish_local(self, name: str) -> Iterator[IO[bytes]]:
        final = self.join(name)
        tmp = final + TMP_SUFFIX
        try:
            with open(tmp, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(self.path)

    @contextmanager
    def _publish_remote(self, name: str) -> Iterator[IO[bytes]]:
        with tempfile.NamedTemporaryFile(prefix="pairfarm-archive-", suffix=".parquet") as spool:
            yield spool
            spool.flush()
            self.fs.put_file(spool.name, self.join(name))

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise ArchiveError(f"cannot {action} the archive folder {self.directory}: "
                               f"{exc}") from exc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- one file -----------------------------------------------------------------------------

def file_name(batches: list[Batch]) -> str:
    return f"batches-{batches[0].id:012d}-{batches[-1].id:012d}.parquet"


def pick_batches(conn: psycopg.Connection, settings: ArchiveSettings) -> list[Batch]:
    """Lock the next file's batches (call inside the file's transaction)."""
    rows = conn.execute(Q.sql("archive_pick"), {
        "min_age": settings.min_age_s, "max_candidates": settings.file_candidates,
        "statuses": list(settings.statuses)})
    return [Batch(int(r[0]), int(r[1]), str(r[2]), (r[0], r[2], *r[3:])) for r in rows]


def write_file(conn: psycopg.Connection, folder: Folder, batches: list[Batch]) -> ArchivedFile:
    """Write the batches' candidates into their file and delete their rows (inside the
    file's transaction); the file is in the folder when this returns."""
    name = file_name(batches)
    with folder.publish(name) as out:
        rows = _write_parquet(conn, batches, out)
        size = out.tell()
    return ArchivedFile(name=name, first_batch_id=batches[0].id,
                        last_batch_id=batches[-1].id, batches=len(batches),
                        candidates=rows, file_bytes=size)


def record_file(conn: psycopg.Connection, folder: Folder, batches: list[Batch],
                written: ArchivedFile) -> None:
    """Record the file, add the batches to the archived totals and delete them (inside
    the file's transaction; its commit makes the archive true)."""
    ids = {"batch_ids": [b.id for b in batches]}
    conn.execute(Q.sql("archive_record"), {
        "directory": folder.directory, "name": written.name,
        "first": written.first_batch_id, "last": written.last_batch_id,
        "batches": written.batches, "candidates": written.candidates,
        "file_bytes": written.file_bytes})
    for statement in ("archive_add_totals", "archive_add_outcomes", "archive_add_minutes",
                      "archive_add_worker_downloads", "archive_add_similarity",
                      "archive_delete_members",
                      "archive_delete_batches"):
        conn.execute(Q.sql(statement), ids)


def _write_parquet(conn: psycopg.Connection, batches: list[Batch], out: IO[bytes]) -> int:
    """Each batch's candidates, in batch then candidate id order, into ``out``; their rows
    deleted. Returns the rows written. The server copies batch i + 1 while a thread
    parses and compresses batch i (Arrow releases the GIL)."""
    sink = _ParquetSink(out)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-write") as pool:
            previous: Future[None] | None = None
            for batch in batches:
                data, deleted = _copy_batch(conn, batch)
                if previous is not None:
                    previous.result()
                previous = pool.submit(sink.add, batch, data, deleted)
            if previous is not None:
                previous.result()
    finally:
        sink.close()
    return sink.rows


def _copy_batch(conn: psycopg.Connection, batch: Batch) -> tuple[bytes, int]:
    """One batch's candidates as ``archive_copy``'s CSV, and how many rows its delete of
    them removed."""
    params = {"batch_id": batch.id}
    with conn.cursor() as cur:
        with cur.copy(Q.sql("archive_copy"), params) as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        deleted = cur.execute(Q.sql("archive_delete_candidates"), params).rowcount
    return data, deleted


class _ParquetSink:
    """Batches' rows into one parquet file, in row groups of ``ROW_GROUP_ROWS``."""

    def __init__(self, out: IO[bytes]) -> None:
        self._writer = pq.ParquetWriter(out, SCHEMA, compression="zstd")
        self._buffered: list[pa.Table] = []
        self._pending = 0
        self.rows = 0

    def add(self, batch: Batch, data: bytes, deleted: int) -> None:
        candidates = _parse(data)
        if deleted != candidates.num_rows:
            raise ArchiveError(f"batch {batch.id}: {candidates.num_rows} candidates read "
                               f"but {deleted} deleted; nothing was archived")
        self._buffered.append(_with_batch(candidates, batch))
        self._pending += candidates.num_rows
        self.rows += candidates.num_rows
        if self._pending >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._buffered:
            self._writer.write_table(pa.concat_tables(self._buffered), ROW_GROUP_ROWS)
        self._buffered.clear()
        self._pending = 0


def _parse(data: bytes) -> pa.Table:
    """``archive_copy``'s CSV as a table of ``CANDIDATE_SCHEMA`` (an unquoted empty field
    is NULL, a quoted one an empty string)."""
    if not data:
        return CANDIDATE_SCHEMA.empty_table()
    return pa_csv.read_csv(
        io.BytesIO(data),
        read_options=pa_csv.ReadOptions(column_names=CANDIDATE_SCHEMA.names),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict(CANDIDATE_COLUMNS), strings_can_be_null=True,
            quoted_strings_can_be_null=False))


def _with_batch(candidates: pa.Table, batch: Batch) -> pa.Table:
    """The candidates' table with their batch's columns beside each row."""
    n = candidates.num_rows
    columns = [pa.repeat(pa.scalar(value, kind), n)
               for (_, kind), value in zip(BATCH_COLUMNS, batch.values, strict=True)]
    return pa.Table.from_arrays([*candidates.columns, *columns], schema=SCHEMA)


# -- a run --------------------------------------------------------------------------------

def archive(database_url: str, settings: ArchiveSettings, *, until_hot: int | None = None,
            lock_wait_s: float = 0.0,
            should_stop: Callable[[], bool] = lambda: False) -> ArchiveRun:
    """Archive finished batches, a file at a time, until none is left (or the hot tables
    hold at most ``until_hot`` candidates, or ``should_stop()``); first remove the folder's
    unrecorded files. Waits up to ``lock_wait_s`` for another run to end, else skips."""
    folder = Folder(settings.location)
    with raw_connection(database_url) as conn:
        hot = hot_candidates(conn)
        if until_hot is not None and hot <= until_hot:
            return ArchiveRun(hot_before=hot, hot_after=hot)
        if not _lock(conn, lock_wait_s):
            return ArchiveRun(hot_before=hot, hot_after=hot, skipped=True)
        try:
            removed = remove_garbage(conn, folder)
            files = _archive_files(conn, folder, settings, until_hot, should_stop)
            return ArchiveRun(tuple(files), tuple(removed), hot, hot_candidates(conn))
        finally:
            conn.execute(Q.sql("archive_unlock"))


def _archive_files(conn: psycopg.Connection, folder: Folder, settings: ArchiveSettings,
                   until_hot: int | None, should_stop: Callable[[], bool]) -> list[ArchivedFile]:
    files: list[ArchivedFile] = []
    while not should_stop() and (until_hot is None or hot_candidates(conn) > until_hot):
        written = archive_one_file(conn, folder, settings)
        if written is None:
            break
        log.info("archived batches %d-%d (%d batches, %d candidates) into %s",
                 written.first_batch_id, written.last_batch_id, written.batches,
                 written.candidates, folder.join(written.name))
        files.append(written)
    return files


def archive_one_file(conn: psycopg.Connection, folder: Folder,
                     settings: ArchiveSettings) -> ArchivedFile | None:
    """One file in one transaction; None when no batch is finished."""
    with conn.transaction():
        batches = pick_batches(conn, settings)
        if not batches:
            return None
        written = write_file(conn, folder, batches)
        record_file(conn, folder, batches, written)
    return written


def remove_garbage(conn: psycopg.Connection, folder: Folder) -> list[str]:
    """Remove the folder's archive and temporary files that no committed run recorded."""
    recorded = {r[0] for r in conn.execute(Q.sql("archive_recorded"),
                                           {"directory": folder.directory})}
    garbage = [n for n in folder.names() if n not in recorded]
    for name in garbage:
        log.info("removing %s: no archive run recorded it", folder.join(name))
        folder.remove(name)
    return garbage


def hot_candidates(conn: psycopg.Connection) -> int:
    """Candidates in the hot tables: ingested less archived."""
    row = conn.execute(Q.sql("archive_hot_candidates")).fetchone()
    return int(row[0]) if row else 0


def _lock(conn: psycopg.Connection, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        row = conn.execute(Q.sql("archive_lock")).fetchone()
        if row and row[0]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_POLL_S)




# -- the automatic mode ---------------------------------------------------------------------

class AutoArchiver:
    """A thread that archives whenever the hot tables hold more than the settings'
    ``hot_max_candidates``, looking every ``interval_s``.

    Resource handling: ``start`` starts one daemon thread; ``stop`` asks it to stop after
    the file in progress and joins it. Error handling: a failed round is logged and tried
    again at the next look; the thread never dies of it (with several coordinator
    processes, the one that holds the lock archives, the others skip)."""

    def __init__(self, database_url: str, settings: ArchiveSettings) -> None:
        self._url = database_url
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pairfarm-archive",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.interval_s):
            self.tick()

    def tick(self) -> ArchiveRun | None:
        try:
            return archive(self._url, self._settings,
                           until_hot=self._settings.hot_max_candidates,
                           should_stop=self._stop.is_set)
        except (CoordinatorError, psycopg.Error) as exc:
            log.warning("archive: %s", exc)
            return None


def describe(run: ArchiveRun) -> str:
    """One line saying what a run did."""
    if run.skipped:
        return "another archive run holds this database's archive lock: nothing done"
    parts = [f"archived {run.batches} batches ({run.candidates} candidates) into "
             f"{len(run.files)} files"]
    if run.removed:
        parts.append(f"removed {len(run.removed)} unrecorded files")
    parts.append(f"hot candidates {run.hot_before} -> {run.hot_after}")
    return "; ".join(parts)
