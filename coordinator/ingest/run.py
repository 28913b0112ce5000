"""Ingest files one after another, each in its own transaction, with a progress bar.

Within a file, one worker thread reads, validates, hashes and encodes the next chunk (and
takes its block of ids) while the server copies the current one (``prefetched``): Arrow,
hashlib and psycopg release the GIL, so the Python side runs on the other core beside the
server's work instead of adding to it.

Resource handling: two psycopg connections for the whole run (the files' transactions,
and the id blocks'), closed at the end; the
rejects file (if asked for) is closed at the end; the prefetch thread is joined when the
file ends or fails (after the chunk it is preparing). Error handling: the first malformed
file stops the run with ``IngestError`` (files before it stay loaded, it loads nothing).
"""

from __future__ import annotations

import csv
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from coordinator.db import raw_connection
from coordinator.errors import IngestError
from coordinator.ingest.ids import IdBlocks
from coordinator.ingest.loader import FileLoader, FileSummary, Prepared
from coordinator.ingest.reader import InputFile, detect, read_batches
from coordinator.ingest.validate import Columns, Validated, validate
from coordinator.queries import Q

REJECT_FIELDS = ("file", "row", "reason", "url")
_END = object()
T = TypeVar("T")


def ingest(database_url: str, paths: Sequence[Path], columns: Columns, *,
           fmt: str | None = None, rejects: Path | None = None,
           progress: Progress | None = None) -> list[FileSummary]:
    """Load ``paths`` into the candidates table; one summary per file."""
    sources = [detect(p, fmt) for p in paths]
    with _connect(database_url) as conn, _connect(database_url) as id_conn, \
            _rejects_writer(rejects) as writer:
        ids = IdBlocks(id_conn)
        summaries = [_ingest_file(conn, ids, source, columns, writer=writer,
                                  progress=progress)
                     for source in sources]
        conn.execute(Q.sql("ingest_analyze"))
    return summaries


def _ingest_file(conn: psycopg.Connection, ids: IdBlocks, source: InputFile,
                 columns: Columns, *, writer: Any, progress: Progress | None) -> FileSummary:
    task = progress.add_task(source.path.name, total=None) if progress else None
    try:
        with conn.transaction():
            loader = FileLoader(conn, source, ids.reserve)
            with closing(prefetched(_prepared(loader, source, columns))) as chunks:
                for checked, chunk in chunks:
                    loader.write(chunk)
                    _write_rejects(writer, source, checked)
                    if progress is not None and task is not None:
                        progress.update(task, advance=chunk.read)
            return loader.finish()
    except IngestError as exc:
        message = str(exc)
        prefix = "" if message.startswith(source.name) else f"{source.name}: "
        raise IngestError(f"{prefix}{message} (nothing of this file was loaded)") from exc
    except psycopg.Error as exc:
        raise IngestError(f"{source.name}: the database refused the data: "
                          f"{str(exc).strip()} (nothing of this file was loaded)") from exc
    finally:
        if progress is not None and task is not None:
            progress.stop_task(task)


def _prepared(loader: FileLoader, source: InputFile,
              columns: Columns) -> Generator[tuple[Validated, Prepared], None, None]:
    """The file's chunks, validated and prepared for COPY (no transaction)."""
    row = 1
    for batch in read_batches(source, columns.text_columns()):
        checked = validate(batch, columns, row)
        yield checked, loader.prepare(checked, batch.num_rows)
        row += batch.num_rows


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
