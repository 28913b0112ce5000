"""Bulk load of validated rows: ``COPY`` into a temporary staging table, then one
``INSERT ... SELECT ... ON CONFLICT (url) DO NOTHING`` per chunk (which also writes each
new candidate into ``pending_chunks``).

A chunk goes in two steps: ``prepare`` (no database: cast to the staging types, CSV
bytes) and ``write`` (COPY, INSERT). The caller may run ``prepare`` of the next chunk in
another thread while ``write`` waits for the server (``coordinator.ingest.run``).

One file is one transaction: a file that turns out malformed half-way loads nothing, and
its ``ingests`` record disappears with it. Extra columns travel typed (bigint, double,
boolean, text) and become one ``jsonb`` object per row, keyed by their input names.

Resource handling: the caller owns the psycopg connection; the staging table is dropped
at commit. Error handling: driver errors become ``IngestError`` naming the file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg import sql

from coordinator.errors import IngestError
from coordinator.ingest.reader import InputFile
from coordinator.ingest.validate import Validated
from coordinator.models import CHUNK_SIZE
from coordinator.queries import Q

#: Arrow type test -> PostgreSQL type of a staging column
PG_TYPES: tuple[tuple[Callable[[pa.DataType], bool], str], ...] = (
    (pa.types.is_boolean, "boolean"),
    (pa.types.is_integer, "bigint"),
    (pa.types.is_floating, "double precision"),
)
MAX_PAIRS_PER_CALL = 50  # jsonb_build_object takes at most 100 arguments


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


def pg_type(kind: pa.DataType) -> str:
    return next((pg for test, pg in PG_TYPES if test(kind)), "text")


class FileLoader:
    """Loads the validated chunks of one file inside the caller's transaction."""

    def __init__(self, conn: psycopg.Connection, source: InputFile) -> None:
        self.conn = conn
        self.source = source
        self.summary = FileSummary(source=source.name)
        self._extras: list[tuple[str, str]] | None = None  # (input name, pg type)
        self._staged = False
        self._ingest_id = int(self._one(Q.sql("ingest_insert_record"),
                                        {"source": source.name}))

    def load(self, chunk: Validated, read: int) -> None:
        self.write(self.prepare(chunk, read))

    def prepare(self, chunk: Validated, read: int) -> Prepared:
        """The chunk as CSV in the staging table's column order (no database)."""
        good = chunk.good
        if good.num_rows == 0:
            return Prepared(memoryview(b""), 0, read, chunk.rejected)
        if self._extras is None:
            self._extras = [(f.name, pg_type(f.type)) for f in good.schema][4:]
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(self._conform(good), sink, pa_csv.WriteOptions(include_header=False))
        return Prepared(memoryview(sink.getvalue()), good.num_rows, read, chunk.rejected)

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
            cur.execute(self._insert_sql(),
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
        assert self._extras is not None
        extra = sql.SQL("").join(
            sql.SQL(", {} {}").format(sql.Identifier(f"e{i}"), sql.SQL(kind))
            for i, (_, kind) in enumerate(self._extras))
        self.conn.execute(sql.SQL(Q.sql("ingest_staging")).format(extra=extra))
        self._staged = True

    def _conform(self, good: pa.Table) -> pa.Table:
        """Cast later chunks to the staging types chosen from the first one."""
        assert self._extras is not None
        names = [f.name for f in good.schema][4:]
        if names != [n for n, _ in self._extras]:
            raise IngestError(f"{self.source.name}: the columns change within the file")
        for i, (name, kind) in enumerate(self._extras, start=4):
            if pg_type(good.schema.field(i).type) != kind:
                good = good.set_column(i, name, good.column(i).cast(pa.string()))
        return good

    def _copy(self, data: memoryview) -> None:
        columns = sql.SQL(", ").join(sql.Identifier(n) for n in self._staging_names())
        statement = sql.SQL(Q.sql("ingest_copy")).format(columns=columns)
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            copy.write(data)

    def _staging_names(self) -> list[str]:
        assert self._extras is not None
        return ["row", "url", "caption", "language",
                *(f"e{i}" for i in range(len(self._extras)))]

    def _insert_sql(self) -> sql.Composed:
        return sql.SQL(Q.sql("ingest_insert")).format(extra=self._extra_expression())

    def _extra_expression(self) -> sql.Composable:
        assert self._extras is not None
        if not self._extras:
            return sql.SQL("NULL::jsonb")
        pairs = [sql.SQL("{}, {}").format(sql.Literal(name), sql.Identifier(f"e{i}"))
                 for i, (name, _) in enumerate(self._extras)]
        calls = [sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(group))
                 for group in _groups(pairs, MAX_PAIRS_PER_CALL)]
        built = sql.SQL(" || ").join(calls)
        return sql.SQL("NULLIF(jsonb_strip_nulls({}), '{{}}'::jsonb)").format(built)


def _groups(items: Sequence[sql.Composable], size: int) -> Iterable[Sequence[sql.Composable]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
