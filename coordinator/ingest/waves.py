"""The dedup in waves: ``url_hashes`` holds the current wave's URL hashes only, so that
each insert descends a small key; earlier waves are frozen tables checked through Bloom
filters.

Why: each new hash lands on a random leaf of the key it goes into. In one key of every
hash ever ingested, the ingest's server CPU per row grew +56 % to 3.2x from the first 10M
rows to the last of 100M, and its WAL per row 2.8-3.8x (full-page images of leaves first
changed since the last checkpoint); with waves of 10M, +16-17 % and +30-39 %
(BENCHMARKS.md, "The dedup in waves").

How, with ``wave_size`` hashes a wave:

- ``url_waves`` has one row per wave: the current one (``frozen_at`` NULL; its hashes
  are ``url_hashes``) and the frozen ones (table ``url_hashes_w<wave>``, never written
  again, and ``bloom``: a ``coordinator.ingest.bloom.SplitBlockBloom`` of its hashes).
- A file's transaction first takes the wave lock shared (``enter``), so no wave freezes
  while it loads; it then reads which waves are frozen, and loads the filters this
  process does not hold yet (they never change). Each prepared chunk's hashes are tested
  against every frozen wave's filter; the few a filter may hold are looked up in that
  wave's table (``FrozenWaves.present``: exact), and those rows are duplicates. The rest
  go into ``url_hashes``, whose primary key catches repeats within the current wave, as
  before. The file adds its inserted count to the current wave's ``hashes``.
- After a file commits, ``freeze_if_full``: once the current wave holds ``wave_size``
  hashes, one transaction takes the wave lock exclusive (waiting for the files in
  flight; new files wait for it), reads the wave's hashes (``_wave_hashes``) into the
  filter, renames ``url_hashes`` to ``url_hashes_w<wave>``, creates an empty
  ``url_hashes``, stores the filter and opens the next wave. One ingest job freezes,
  the others load on. A freeze killed half-way rolls back whole; the next file's end tries
  again.

Exact: every hash is checked against every wave frozen before its file began (filter,
then the table for the filter's "maybe"), and against the current wave by its key; no
wave freezes while a file that writes into it is open. A Bloom filter only skips waves
that certainly lack the hash.

Costs (BENCHMARKS.md): testing 1M hashes ~40 ms plus ~45 ms per frozen wave (16 bits a
key: ~0.13 % of absent hashes go to a table lookup per wave); a filter is 2 bytes per
hash (20 MB a 10M wave), held once per ingest process; a freeze reads the wave's hashes
once.

Resource handling: the caller owns the connections; the filters are cached per process
(``WaveCatalog``), shared by the jobs of a run under a lock.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from coordinator.errors import IngestError
from coordinator.ingest.bloom import BITS_PER_KEY, Lookup, SplitBlockBloom, keys_of
from coordinator.queries import Q

#: hashes a wave holds before it is frozen, unless asked otherwise. Within 10M hashes
#: the key's insert cost stays near its 0-10M level (BENCHMARKS.md); each frozen wave
#: adds a filter test (~45 ms per 1M rows) to the ingest
WAVE_SIZE = 10_000_000
#: heap pages of the wave a freeze reads in one statement (~186 hashes a page)
PAGES_A_READ = 4096


def frozen_table(wave: int) -> str:
    return f"url_hashes_w{wave}"


@dataclass(frozen=True)
class Freeze:
    """A wave frozen: its hashes; the wait for the files in flight, then the time the
    freeze held new files off."""

    wave: int
    hashes: int
    waited_s: float
    locked_s: float


@dataclass(frozen=True)
class FrozenWave:
    wave: int
    bloom: SplitBlockBloom

    @property
    def table(self) -> str:
        return frozen_table(self.wave)


#: (table, hashes) -> those of ``hashes`` the table holds
Probe = Callable[[str, list[bytes]], set[bytes]]


class FrozenWaves:
    """The waves frozen before one file's transaction began; fixed while it lasts."""

    def __init__(self, waves: list[FrozenWave], probe: Probe) -> None:
        self.waves = waves
        self._probe = probe

    def present(self, hashes: list[bytes]) -> set[bytes]:
        """Those of ``hashes`` that a frozen wave holds (exact)."""
        if not self.waves or not hashes:
            return set()
        lookup = Lookup.of(keys_of(hashes))
        found: set[bytes] = set()
        for wave in self.waves:
            maybe = np.flatnonzero(wave.bloom.may_contain(lookup))
            if maybe.size:
                found |= self._probe(wave.table, [hashes[i] for i in maybe])
        return found


def probe_on(conn: psycopg.Connection) -> Probe:
    """A ``Probe`` that looks hashes up on ``conn`` (any session: frozen tables never
    change)."""
    def probe(table: str, hashes: list[bytes]) -> set[bytes]:
        query = sql.SQL(Q.sql("ingest_probe_frozen")).format(table=sql.Identifier(table))
        row = conn.execute(query, {"hashes": [uuid.UUID(bytes=h) for h in hashes]}
                           ).fetchone()
        return set(row[0] or ()) if row else set()
    return probe


class WaveCatalog:
    """The frozen waves' filters, loaded once per process; entering and freezing waves."""

    def __init__(self, wave_size: int = WAVE_SIZE, bits_per_key: int = BITS_PER_KEY) -> None:
        if wave_size < 1:
            raise ValueError(f"a wave holds at least 1 hash, not {wave_size}")
        self.wave_size = wave_size
        self.bits_per_key = bits_per_key
        self._filters: dict[int, SplitBlockBloom] = {}
        self._lock = threading.Lock()
        self._freezer = threading.Lock()  # one job of the process freezes, the others load

    def enter(self, conn: psycopg.Connection, probe: Probe) -> FrozenWaves:
        """In a file's transaction: hold off freezes until it ends; the waves frozen so
        far, their filters loaded."""
        conn.execute(Q.sql("ingest_wave_share"))
        frozen = [int(w) for (w,) in conn.execute(Q.sql("ingest_frozen_waves"))]
        with self._lock:
            missing = [w for w in frozen if w not in self._filters]
            for wave in missing:
                row = conn.execute(Q.sql("ingest_wave_bloom"), {"wave": wave}).fetchone()
                assert row is not None and row[0] is not None
                try:
                    self._filters[wave] = SplitBlockBloom.from_bytes(bytes(row[0]))
                except ValueError as exc:
                    raise IngestError(f"the dedup's frozen wave {wave} has a damaged "
                                      f"filter in url_waves: {exc}") from exc
            waves = [FrozenWave(w, self._filters[w]) for w in frozen]
        return FrozenWaves(waves, probe)

    def freeze_if_full(self, conn: psycopg.Connection) -> Freeze | None:
        """Freeze the current wave if it holds ``wave_size`` hashes or more; what was
        frozen, or None.

        One transaction under the exclusive lock: it waits for the files in flight
        (files that begin meanwhile wait for it), reads the wave's hashes into a filter,
        renames the wave and opens the next. (Building the filter first without the
        lock, then adding the hashes committed meanwhile, held new files off as long:
        the second read of the wave cost as much as the filter; BENCHMARKS.md.)

        One freezer at a time: a job that finds another job of its process, or another
        ingest process, freezing goes on loading instead of building the same filter."""
        row = conn.execute(Q.sql("ingest_current_wave")).fetchone()
        if row is None or int(row[1]) < self.wave_size:
            return None  # the common case: no wait for the exclusive lock
        if not self._freezer.acquire(blocking=False):
            return None  # another job of this process is freezing it
        try:
            return self._freeze_alone(conn, int(row[0]))
        finally:
            self._freezer.release()

    def _freeze_alone(self, conn: psycopg.Connection, first_wave: int) -> Freeze | None:
        """The freeze, unless another ingest process is freezing (it holds the
        freezer's session lock): that one does the work, and this job loads on."""
        got = conn.execute(Q.sql("ingest_freezer_try")).fetchone()
        if not (got and got[0]):
            return None
        try:
            return self._freeze(conn, first_wave)
        finally:
            conn.execute(Q.sql("ingest_freezer_release"))

    def _freeze(self, conn: psycopg.Connection, first_wave: int) -> Freeze | None:
        """Freeze ``first_wave`` if it is still the current wave and still full."""
        start = time.perf_counter()
        with conn.transaction():
            conn.execute(Q.sql("ingest_wave_exclusive"))
            locked = time.perf_counter()
            row = conn.execute(Q.sql("ingest_current_wave")).fetchone()
            assert row is not None, "url_waves has no current wave"
            wave, hashes = int(row[0]), int(row[1])
            if wave != first_wave or hashes < self.wave_size:
                return None  # another ingest froze it meanwhile
            bloom = SplitBlockBloom.for_keys(hashes, self.bits_per_key)
            count = self._add_current(conn, bloom)
            names = {"frozen": sql.Identifier(frozen_table(wave)),
                     "frozen_key": sql.Identifier(f"{frozen_table(wave)}_pkey")}
            conn.execute(sql.SQL(Q.sql("ingest_rename_wave")).format(**names))
            conn.execute(sql.SQL(Q.sql("ingest_rename_wave_key")).format(**names))
            conn.execute(Q.sql("ingest_new_wave_table"))
            conn.execute(Q.sql("ingest_freeze_wave"),
                         {"wave": wave, "hashes": count, "bloom": bloom.to_bytes()})
            conn.execute(Q.sql("ingest_open_wave"), {"wave": wave + 1})
        done = time.perf_counter()
        with self._lock:
            self._filters[wave] = bloom
        return Freeze(wave, count, locked - start, done - locked)

    @staticmethod
    def _add_current(conn: psycopg.Connection, bloom: SplitBlockBloom) -> int:
        """Add ``url_hashes``' hashes (streamed) to ``bloom``; how many there were."""
        count = 0
        for block in _wave_hashes(conn):
            keys = keys_of(block)
            bloom.add(keys)
            count += len(keys)
        return count


def _wave_hashes(conn: psycopg.Connection, pages: int = PAGES_A_READ) -> Iterator[bytes]:
    """The current wave's hashes, concatenated, ``pages`` heap pages at a time (TID range
    scans, each one ``string_agg``: ~12 MB). A ``COPY`` sends one message a row, and
    taking 11M of them in Python took 17.8 s where this took 2.9 s."""
    row = conn.execute(Q.sql("ingest_wave_pages")).fetchone()
    assert row is not None
    with conn.cursor(binary=True) as cur:
        for first in range(0, int(row[0]), pages):
            cur.execute(Q.sql("ingest_wave_hashes"),
                        {"first": f"({first},0)", "last": f"({first + pages},0)"})
            got = cur.fetchone()
            if got is not None and got[0]:
                yield bytes(got[0])
