"""Bulk load of validated rows: ``COPY`` into a temporary staging table, then one
``INSERT ... SELECT ... ON CONFLICT (url) DO NOTHING`` per chunk (which also writes each
new candidate into ``pending_chunks``).

A chunk goes in two steps: ``prepare`` (no database: the extra columns become one JSON
object per row, then CSV bytes) and ``write`` (COPY, INSERT). The caller may run
``prepare`` of the next chunk in another thread while ``write`` waits for the server
(``coordinator.ingest.run``).

One file is one transaction: a file that turns out malformed half-way loads nothing, and
its ``ingests`` record disappears with it. Extra columns keep their kind (integer, float,
boolean, text; the kinds of the file's first chunk, a later chunk whose column changes
kind goes as text) and become one ``json`` object per row, keyed by their input names in
input order, missing values left out, no object when all are missing. The objects are
built here with orjson, in the thread that prepares the next chunk (~3 s of CPU per
million rows of two extra columns, beside the server's ~16 s): built in the INSERT with
``jsonb_build_object`` into ``jsonb``, the server's COPY + INSERT took 18.8 s per million
rows where it takes 16.3 s now (three runs of each, alternated, on the same machine).

Resource handling: the caller owns the psycopg connection; the staging table is dropped
at commit. Error handling: driver errors become ``IngestError`` naming the file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from coordinator.errors import IngestError
from coordinator.ingest.reader import InputFile
from coordinator.ingest.validate import Validated
from coordinator.models import CHUNK_SIZE
from coordinator.queries import Q

#: Arrow type test -> kind of an extra column
KINDS: tuple[tuple[Callable[[pa.DataType], bool], str], ...] = (
    (pa.types.is_boolean, "boolean"),
    (pa.types.is_integer, "integer"),
    (pa.types.is_floating, "float"),
)
#: the staging table's columns, in the CSV's order
STAGING_COLUMNS = ("row", "url", "caption", "language", "extra")


@dataclass(frozen=True)
class Prepared:
    """One validated chunk as CSV for COPY, and what it counts towards the summary."""

    csv: memoryview
    rows: int
    read: int
    rejected: Counter[str]


@dataclass
class FileSummary:
    source: str
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def add(self, other: FileSummary) -> None:
        self.read += other.read
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.rejected.update(other.rejected)


def kind_of(arrow_type: pa.DataType) -> str:
    return next((name for test, name in KINDS if test(arrow_type)), "text")


def extra_json(table: pa.Table, names: list[str]) -> pa.Array:
    """One JSON object (text) per row of the columns ``names``; null where all are null."""
    if not names:
        return pa.nulls(table.num_rows, pa.string())
    columns = [_python_values(table.column(name)) for name in names]
    dumps = orjson.dumps
    objects = []
    for values in zip(*columns, strict=True):
        found = {k: v for k, v in zip(names, values, strict=True) if v is not None}
        objects.append(dumps(found).decode() if found else None)
    return pa.array(objects, pa.string())


def _python_values(column: pa.ChunkedArray) -> list[Any]:
    """The column's values as Python objects; float32 through its shortest decimal
    text, so that 0.31f stays 0.31 rather than 0.3100000023841858."""
    if pa.types.is_floating(column.type) and column.type.bit_width < 64:
        return [None if v is None else float(v)
                for v in pc.cast(column, pa.string()).to_pylist()]
    return column.to_pylist()


class ChunkPreparer:
    """The validated chunks of one file as CSV for the staging table (no database); the
    first chunk fixes the kinds of the extra columns."""

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self._extras: list[tuple[str, str]] | None = None  # (input name, kind)

    def prepare(self, chunk: Validated, read: int) -> Prepared:
        """The chunk as CSV in the staging table's column order."""
        good = chunk.good
        if good.num_rows == 0:
            return Prepared(memoryview(b""), 0, read, chunk.rejected)
        if self._extras is None:
            self._extras = [(f.name, kind_of(f.type)) for f in good.schema][4:]
        conformed = self._conform(good)
        staged = pa.table([*conformed.columns[:4],
                           extra_json(conformed, [n for n, _ in self._extras])],
                          names=list(STAGING_COLUMNS))
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(staged, sink, pa_csv.WriteOptions(include_header=False))
        return Prepared(memoryview(sink.getvalue()), good.num_rows, read, chunk.rejected)

    def _conform(self, good: pa.Table) -> pa.Table:
        """Cast a later chunk's extra column to text where its kind differs from the first
        chunk's."""
        assert self._extras is not None
        names = [f.name for f in good.schema][4:]
        if names != [n for n, _ in self._extras]:
            raise IngestError(f"{self.source_name}: the columns change within the file")
        for i, (name, kind) in enumerate(self._extras, start=4):
            if kind_of(good.schema.field(i).type) != kind:
                good = good.set_column(i, name, good.column(i).cast(pa.string()))
        return good


class FileLoader:
    """Loads the validated chunks of one file inside the caller's transaction."""

    def __init__(self, conn: psycopg.Connection, source: InputFile) -> None:
        self.conn = conn
        self.source = source
        self.summary = FileSummary(source=source.name)
        self._preparer = ChunkPreparer(source.name)
        self._staged = False
        self._ingest_id = int(self._one(Q.sql("ingest_insert_record"),
                                        {"source": source.name}))

    def load(self, chunk: Validated, read: int) -> None:
        self.write(self.prepare(chunk, read))

    def prepare(self, chunk: Validated, read: int) -> Prepared:
        """The chunk as CSV for ``write`` (no database: may run in another thread)."""
        return self._preparer.prepare(chunk, read)

    def write(self, chunk: Prepared) -> None:
        """COPY the chunk into staging and insert its new candidates."""
        self.summary.read += chunk.read
        self.summary.rejected.update(chunk.rejected)
        if chunk.rows == 0:
            return
        if not self._staged:
            self._create_staging()
        self._copy(chunk.csv)
        with self.conn.cursor() as cur:
            cur.execute(Q.sql("ingest_insert"),
                        {"ingest_id": self._ingest_id, "chunk_size": CHUNK_SIZE})
            answer = cur.fetchone()
            assert answer is not None
            inserted = int(answer[0])
            cur.execute(Q.sql("ingest_truncate"))
        self.summary.inserted += inserted
        self.summary.duplicates += chunk.rows - inserted

    def finish(self) -> FileSummary:
        s = self.summary
        self.conn.execute(Q.sql("ingest_finish_record"), {
            "rows_read": s.read, "inserted": s.inserted, "duplicates": s.duplicates,
            "rejected": json.dumps(dict(s.rejected)), "ingest_id": self._ingest_id})
        return s

    def _one(self, query: str, params: dict[str, object]) -> Any:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]

    def _create_staging(self) -> None:
        self.conn.execute(Q.sql("ingest_staging"))
        self._staged = True

    def _copy(self, data: memoryview) -> None:
        with self.conn.cursor() as cur, cur.copy(Q.sql("ingest_copy")) as copy:
            copy.write(data)
