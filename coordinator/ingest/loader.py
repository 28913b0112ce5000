"""Bulk load of validated rows, with exact URL dedup through ``url_hashes``.

Chunks (the reader's batches, 131,072 rows of parquet) go in runs (``PreparedRun``: at
least ``coordinator.ingest.run.RUN_ROWS`` rows, whole chunks), in two steps:

- ``prepare`` (no transaction; may run in another thread while the server works on the
  run before, see ``coordinator.ingest.run``): hash each URL
  (``coordinator.ingest.urlhash``), drop the chunk's own repeats and the URLs an earlier
  chunk of the run had (the first row wins), take a block of ids
  (``coordinator.ingest.ids``), and encode the rows for binary ``COPY``
  (``coordinator.ingest.copybinary``): the candidates with their ids and their
  ``pending_chunks`` (``CHUNK_SIZE`` consecutive ids a row);
  ``run_of`` sorts the run's hashes into one binary ``COPY``.
  Rows whose hash a frozen wave of the dedup holds are dropped there too, as duplicates
  (``coordinator.ingest.waves``: a Bloom filter test, then a lookup of the few it may
  hold).
- ``write`` (the file's transaction): insert the run's hashes into ``url_hashes`` (the
  current wave); drop the rows whose hash was already there (an earlier file, an
  earlier run, or a candidate archived since: duplicates, counted); ``COPY`` the rest
  into ``candidates`` and their chunks into ``pending_chunks``, chunk by chunk.

Each hash goes to a random leaf of ``url_hashes``' primary key; the more of a run land on
the same leaf, the fewer leaves each insert must find and bring into the CPU's caches
(BENCHMARKS.md: runs of ~1M hashes cost 23 % less backend CPU per row than runs of 131k
at 8-10M rows). A run is prepared whole before the server gets it, so long runs delay
the server's start on each file; ``RUN_ROWS`` is one chunk (see there).

The hashes go in by ``COPY`` in a savepoint, the cheap path: with no duplicate in the
run it is the whole dedup. A duplicate makes the ``COPY`` fail on the unique index;
the run is then rolled back to the savepoint and inserted with ``ON CONFLICT DO
NOTHING`` from a temporary table, which answers the hashes already present. A run that
had duplicates sends the next one the second way directly; a run without, the first
way. Both are exact with concurrent ingests: a hash another open transaction inserted
waits for it.

Each savepoint is a subtransaction of the file's transaction. PostgreSQL keeps 64 of them
per transaction in shared memory; a file of more than 64 runs through this path (~8.4M
rows in runs of one chunk) makes other sessions' snapshots "suboverflowed" while it loads: their
visibility checks of rows written since the file's transaction began (its own, and the
farm's leases meanwhile) then look up ``pg_subtrans``.

``COPY`` writes the wide rows through PostgreSQL's multi-insert path and maintains
``candidates``' primary key only; the old ``INSERT ... SELECT ... ON CONFLICT (url)`` from
a staging table also kept a unique index on the URL text.

One file is one transaction: a file that turns out malformed half-way, or an ingest
killed half-way, loads nothing (no candidate, no hash, no chunk), and its ``ingests``
record disappears with it; its reserved ids stay unused. Extra columns keep their kind
(integer, float, boolean, text; the kinds of the file's first chunk, a later chunk whose
column changes kind goes as text) and become one ``json`` object per row, keyed by their
input names in input order, missing values left out, no object when all are missing,
built with Arrow compute in the preparing thread.

Resource handling: the caller owns both psycopg connections (the file's and the id
blocks'); the temporary table is dropped at commit. Error handling: driver errors become
``IngestError`` naming the file (``coordinator.ingest.run``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import errors

from coordinator.errors import IngestError
from coordinator.ingest import copybinary
from coordinator.ingest.reader import InputFile
from coordinator.ingest.urlhash import sorted_copy_binary, url_hashes
from coordinator.ingest.validate import Validated
from coordinator.ingest.waves import FrozenWaves
from coordinator.models import CHUNK_SIZE
from coordinator.queries import Q

#: Arrow type test -> kind of an extra column
KINDS: tuple[tuple[Callable[[pa.DataType], bool], str], ...] = (
    (pa.types.is_boolean, "boolean"),
    (pa.types.is_integer, "integer"),
    (pa.types.is_floating, "float"),
)


@dataclass(frozen=True)
class Prepared:
    """One validated chunk, its own repeats dropped, encoded for COPY; and what it counts
    towards the summary."""

    rows: pa.Table  # url, caption, language, extra (json text): the rows to insert
    hashes: list[bytes]  # each row's URL hash, in row order
    first_id: int  # ids first_id .. first_id + len(rows) - 1, in row order
    candidates: bytes  # the candidates, as binary COPY (ingest_copy_candidates)
    chunks: bytes  # their pending_chunks rows with their payload, as binary COPY
    read: int
    #: rows dropped before the server: repeats of an earlier row of the run, or URLs a
    #: frozen wave of the dedup holds (coordinator.ingest.waves)
    repeats: int
    rejected: Counter[str]

    @property
    def count(self) -> int:
        return self.rows.num_rows


@dataclass(frozen=True)
class PreparedRun:
    """Consecutive chunks of one file whose hashes go to the server in one sorted run
    (``run_of``): no hash occurs twice among them."""

    chunks: list[Prepared]
    hash_copy: bytes  # every chunk's hashes, sorted, as COPY binary (b"" when none)


def run_of(chunks: list[Prepared]) -> PreparedRun:
    hashes = [h for chunk in chunks for h in chunk.hashes]
    return PreparedRun(chunks, sorted_copy_binary(hashes) if hashes else b"")


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
    """One JSON object (text) per row of the columns ``names``; null where all are null.

    Built with Arrow compute, a column at a time (~0.2 s per million rows of two
    columns; orjson row by row took 1.7-3 s); a text column holding a control character
    goes through orjson."""
    if not names:
        return pa.nulls(table.num_rows, pa.string())
    # each member with a leading comma, "" when missing (null_handling="skip" drops the
    # rows where every value is null in pyarrow 26)
    members = [pc.fill_null(_json_member(name, table.column(name)), "") for name in names]
    body = pc.binary_join_element_wise(*members, "")
    wrapped = pc.binary_join_element_wise("{", pc.utf8_slice_codeunits(body, 1), "}", "")
    return pc.if_else(pc.equal(body, ""), pa.scalar(None, pa.string()), wrapped)


def _json_member(name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``,"name":value`` per row, null where the value is null."""
    kind = column.type
    if pa.types.is_floating(kind):
        text = pc.cast(column, pa.string())  # the shortest decimal; float32 as float32
        whole = pc.invert(pc.match_substring_regex(text, "[.eEn]"))
        text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        text = pc.cast(column, pa.string())
    else:
        text = _json_string(pc.cast(column, pa.string()))
    return pc.binary_join_element_wise("," + orjson.dumps(name).decode() + ":", text, "")


def _json_string(values: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    if pc.any(pc.match_substring_regex(values, "[\\x00-\\x1f]")).as_py():
        dumps = orjson.dumps
        return pa.array([None if v is None else dumps(v).decode()
                         for v in values.to_pylist()], pa.string())
    escaped = pc.replace_substring(pc.replace_substring(values, "\\", "\\\\"),
                                   '"', '\\"')
    return pc.binary_join_element_wise('"', escaped, '"', "")


def first_occurrences(hashes: list[bytes], earlier: set[bytes]) -> list[int] | None:
    """The positions of the first occurrence of each hash not in ``earlier``, in order;
    None when every hash occurs once and none is in ``earlier``."""
    distinct = set(hashes)
    if len(distinct) == len(hashes) and distinct.isdisjoint(earlier):
        return None
    first: dict[bytes, int] = {}
    for i, h in enumerate(hashes):
        if h not in earlier:
            first.setdefault(h, i)
    return sorted(first.values())


def chunk_fragments(rows: pa.Table) -> list[pa.Array]:
    """``rows`` (url, caption, language, extra: the loader's JSON text or null) in groups
    of ``CHUNK_SIZE`` (fewer in the last), as each group's lease payload: one UTF-8 value
    a group and field, the field's JSON values joined by commas in row order
    (``coordinator.payload``). The text fields are one ``orjson.dumps`` of each group's
    list without its brackets (0.55 s per 1M rows of three columns; Arrow's escaping and
    joining took 0.96 s), the extra objects one Arrow join."""
    n = rows.num_rows
    dumps = orjson.dumps
    fragments = []
    for name in ("url", "caption", "language"):
        values = rows.column(name).to_pylist()
        fragments.append(pa.array([dumps(values[s:s + CHUNK_SIZE])[1:-1]
                                   for s in range(0, n, CHUNK_SIZE)], pa.large_binary()))
    offsets = pa.array([*range(0, n, CHUNK_SIZE), n], pa.int32())
    extra = _flat(pc.fill_null(rows.column("extra"), "{}"))
    fragments.append(pc.binary_join(pa.ListArray.from_arrays(offsets, extra), ","))
    return fragments


def pending_chunks_copy(rows: pa.Table, first_id: int) -> bytes:
    """``rows`` with ids from ``first_id`` as the binary ``COPY`` of their
    ``pending_chunks`` in the column order of ``ingest_copy_chunks``: ``CHUNK_SIZE``
    consecutive ids a row (fewer in the last) with their ``chunk_fragments``."""
    ids = copybinary.id_array_fields(first_id, rows.num_rows, CHUNK_SIZE)
    return copybinary.copy_data([ids, *map(copybinary.text_fields, chunk_fragments(rows))])


def _flat(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def candidates_copy(rows: pa.Table, first_id: int, ingest_id: int) -> bytes:
    """``rows`` with their ids and ``ingest_id`` as the binary ``COPY`` of their
    ``candidates`` in the column order of ``ingest_copy_candidates``."""
    n = rows.num_rows
    text = copybinary.text_fields
    return copybinary.copy_data([
        copybinary.int8_fields(np.arange(first_id, first_id + n, dtype=np.int64)),
        text(rows.column(0)), text(rows.column(1)), text(rows.column(2)),
        copybinary.int4_fields(ingest_id, n), text(rows.column(3))])


class ChunkPreparer:
    """The validated chunks of one file, encoded for COPY (no transaction); the first
    chunk fixes the kinds of the extra columns. ``reserve(n)`` answers the first of
    ``n`` consecutive candidate ids."""

    def __init__(self, source_name: str, ingest_id: int,
                 reserve: Callable[[int], int], frozen: FrozenWaves | None = None) -> None:
        self.source_name = source_name
        self.ingest_id = ingest_id
        self._reserve = reserve
        self._frozen = frozen
        self._extras: list[tuple[str, str]] | None = None  # (input name, kind)

    def prepare(self, chunk: Validated, read: int, seen: set[bytes] | None = None) -> Prepared:
        """``chunk`` encoded; its rows whose hash is in ``seen`` (an earlier chunk of the
        same run), repeats an earlier row or is in a frozen wave, dropped as repeats; its
        hashes added to ``seen``."""
        good = chunk.good
        if good.num_rows == 0:
            return self._encode(pa.table({}), [], read, 0, chunk.rejected)
        if self._extras is None:
            self._extras = [(f.name, kind_of(f.type)) for f in good.schema][4:]
        hashes = url_hashes(good.column(1))
        keep = first_occurrences(hashes, seen or set())
        if seen is not None:
            seen.update(hashes)
        if keep is not None:
            good = good.take(pa.array(keep, pa.int64()))
            hashes = [hashes[i] for i in keep]
        earlier = self._frozen.present(hashes) if self._frozen is not None else set()
        if earlier:
            keep = [i for i, h in enumerate(hashes) if h not in earlier]
            good = good.take(pa.array(keep, pa.int64()))
            hashes = [hashes[i] for i in keep]
        conformed = self._conform(good)
        rows = pa.table([*conformed.columns[1:4],
                         extra_json(conformed, [n for n, _ in self._extras])],
                        names=["url", "caption", "language", "extra"])
        return self._encode(rows, hashes, read, chunk.good.num_rows - rows.num_rows,
                            chunk.rejected)

    def _encode(self, rows: pa.Table, hashes: list[bytes], read: int, repeats: int,
                rejected: Counter[str]) -> Prepared:
        n = len(hashes)
        if n == 0:
            return Prepared(rows, [], 0, b"", b"", read, repeats, rejected)
        first_id = self._reserve(n)
        return Prepared(rows, hashes, first_id,
                        candidates_copy(rows, first_id, self.ingest_id),
                        pending_chunks_copy(rows, first_id), read, repeats, rejected)

    def without(self, chunk: Prepared, present: set[bytes]) -> Prepared:
        """``chunk`` without the rows whose hash is in ``present``; the kept rows take
        the first ids of the chunk's block, in order."""
        keep = [i for i, h in enumerate(chunk.hashes) if h not in present]
        rows = chunk.rows.take(pa.array(keep, pa.int64()))
        hashes = [chunk.hashes[i] for i in keep]
        if not keep:
            return replace(chunk, rows=rows, hashes=[], candidates=b"", chunks=b"")
        return replace(chunk, rows=rows, hashes=hashes,
                       candidates=candidates_copy(rows, chunk.first_id, self.ingest_id),
                       chunks=pending_chunks_copy(rows, chunk.first_id))

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

    def __init__(self, conn: psycopg.Connection, source: InputFile,
                 reserve: Callable[[int], int], frozen: FrozenWaves | None = None) -> None:
        self.conn = conn
        self.source = source
        self.summary = FileSummary(source=source.name)
        self._ingest_id = int(self._one(Q.sql("ingest_insert_record"),
                                        {"source": source.name}))
        self._preparer = ChunkPreparer(source.name, self._ingest_id, reserve, frozen)
        self._staged = False
        self._try_copy = True

    def prepare(self, chunk: Validated, read: int, seen: set[bytes] | None = None) -> Prepared:
        """The chunk encoded for ``write`` (no transaction: may run in another thread);
        ``seen``: the hashes of the run's earlier chunks (``ChunkPreparer.prepare``)."""
        return self._preparer.prepare(chunk, read, seen)

    def write(self, run: PreparedRun) -> None:
        """Insert the run's new hashes, then each chunk's new candidates and their
        pending chunks."""
        for chunk in run.chunks:
            self.summary.read += chunk.read
            self.summary.rejected.update(chunk.rejected)
            self.summary.duplicates += chunk.repeats
        if not run.hash_copy:
            return
        present = self._insert_hashes(run.hash_copy)
        for chunk in run.chunks:
            self._write_rows(chunk, present)

    def _write_rows(self, chunk: Prepared, present: set[bytes]) -> None:
        """The chunk's candidates whose hash was not ``present``, and their chunks."""
        if present and chunk.count:
            fresh = self._preparer.without(chunk, present)
            self.summary.duplicates += chunk.count - fresh.count
            chunk = fresh
        if chunk.count:
            self._copy(Q.sql("ingest_copy_candidates"), chunk.candidates)
            self._copy(Q.sql("ingest_copy_chunks"), chunk.chunks)
        self.summary.inserted += chunk.count

    def finish(self) -> FileSummary:
        s = self.summary
        self.conn.execute(Q.sql("ingest_finish_record"), {
            "rows_read": s.read, "inserted": s.inserted, "duplicates": s.duplicates,
            "rejected": json.dumps(dict(s.rejected)), "ingest_id": self._ingest_id})
        self.conn.execute(Q.sql("ingest_count_wave"), {"inserted": s.inserted})
        return s

    def _insert_hashes(self, hash_copy: bytes) -> set[bytes]:
        """Insert a run's hashes (COPY binary) into ``url_hashes``; answer those already
        there."""
        if self._try_copy:
            try:
                with self.conn.transaction():
                    self._copy(Q.sql("ingest_copy_hashes"), hash_copy)
                return set()
            except errors.UniqueViolation:
                pass
        present = self._insert_hashes_on_conflict(hash_copy)
        self._try_copy = not present
        return present

    def _insert_hashes_on_conflict(self, hash_copy: bytes) -> set[bytes]:
        if not self._staged:
            self.conn.execute(Q.sql("ingest_staging"))
            self._staged = True
        self._copy(Q.sql("ingest_copy_staging"), hash_copy)
        present = self._one(Q.sql("ingest_insert_hashes"), {})
        self.conn.execute(Q.sql("ingest_truncate"))
        return set(present or ())

    def _one(self, query: str, params: dict[str, object]) -> Any:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]

    def _copy(self, statement: str, data: bytes | memoryview) -> None:
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            copy.write(data)
