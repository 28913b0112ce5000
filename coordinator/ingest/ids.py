"""Blocks of candidate ids taken from ``candidates``' identity sequence, so that the
loader can write each row's id itself and build its ``pending_chunks`` without asking
the server which ids the rows got.

One block is one short transaction on a connection of its own: ``ALTER SEQUENCE``
(changing nothing) locks the sequence against every other session's ``nextval`` and
``setval`` until the commit (a few ms); then ``setval(nextval() + n - 1)`` moves it past
the block. No other session, an ingest or a plain ``INSERT`` taking the column's default,
can get an id inside the block. Ids of rows
that turn out duplicates, or of a file that fails or is killed, are never used: gaps, as
after any rolled-back insert.

Resource handling: the caller owns the connection (autocommit).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from coordinator.queries import Q


class IdBlocks:
    """Reserves blocks of consecutive candidate ids."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        row = conn.execute(Q.sql("ingest_id_sequence")).fetchone()
        assert row is not None and row[0] is not None
        self._sequence = sql.SQL(row[0])

    def reserve(self, count: int) -> int:
        """The first of ``count`` consecutive ids no one else will get (``count`` >= 1)."""
        with self.conn.transaction():
            self.conn.execute(sql.SQL(Q.sql("ingest_lock_sequence")).format(
                sequence=self._sequence))
            row = self.conn.execute(Q.sql("ingest_reserve_ids"), {
                "sequence": self._sequence.as_string(self.conn), "count": count}
            ).fetchone()
        assert row is not None
        return int(row[0])
