"""Ingest files one after another, each in its own transaction, with a progress bar.

Resource handling: one psycopg connection for the whole run, closed at the end; the
rejects file (if asked for) is closed at the end. Error handling: the first malformed
file stops the run with ``IngestError`` (files before it stay loaded, it loads nothing).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

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

from coordinator.db import libpq_url
from coordinator.errors import DatabaseUnavailable, IngestError
from coordinator.ingest.loader import FileLoader, FileSummary
from coordinator.ingest.reader import InputFile, detect, read_batches
from coordinator.ingest.validate import Columns, Validated, validate

REJECT_FIELDS = ("file", "row", "reason", "url")


def ingest(database_url: str, paths: Sequence[Path], columns: Columns, *,
           fmt: str | None = None, rejects: Path | None = None,
           progress: Progress | None = None) -> list[FileSummary]:
    """Load ``paths`` into the candidates table; one summary per file."""
    sources = [detect(p, fmt) for p in paths]
    with _connect(database_url) as conn, _rejects_writer(rejects) as writer:
        summaries = [_ingest_file(conn, source, columns, writer, progress)
                     for source in sources]
        conn.execute("ANALYZE candidates, candidate_batches")
    return summaries


def _ingest_file(conn: psycopg.Connection, source: InputFile, columns: Columns,
                 writer: Any, progress: Progress | None) -> FileSummary:
    task = progress.add_task(source.path.name, total=None) if progress else None
    try:
        with conn.transaction():
            loader = FileLoader(conn, source)
            row = 1
            for batch in read_batches(source, columns.text_columns()):
                checked = validate(batch, columns, row)
                loader.load(checked, batch.num_rows)
                _write_rejects(writer, source, checked)
                row += batch.num_rows
                if progress is not None and task is not None:
                    progress.update(task, advance=batch.num_rows)
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


@contextmanager
def _connect(database_url: str) -> Iterator[psycopg.Connection]:
    try:
        conn = psycopg.connect(libpq_url(database_url), autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {exc}") from exc
    with conn:
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
