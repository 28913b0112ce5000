"""The coordinator's schema as SQLAlchemy models; the Alembic migrations must match it.

Sizing for 10^9+ candidates:

- ``candidates`` rows are wide (URL, caption, extra columns) and written once, at ingest.
  Their per-URL outcome lives in the shard's parquet, never here.
- ``pending_chunks`` holds the candidates no batch holds yet, up to ``CHUNK_SIZE`` ids
  a row. Forming a batch samples it and deletes the rows it takes (a delete writes no
  index entry), so a 10k batch locks and deletes ~625 rows, and the table (with its
  primary key, the lease's index fallback) shrinks as the farm drains. Forming a batch
  never touches the wide rows.
- ``url_hashes`` holds a 16-byte hash of every URL of the current ingest wave, and
  ``url_hashes_w<N>`` those of each frozen wave (``url_waves``): the exact dedup, not
  the URL text, ~16 bytes of key a candidate whatever the URL's length, and each insert
  descends one wave's key, not the whole farm's.
- ``batch_members`` holds the ids of each batch as one array row, written once (and
  their attempts when some are retries). A candidate's state is derived: pending (in a
  ``pending_chunks`` row), waiting for a retry (in a ``retry_chunks`` row) or the state
  of its batch.
- ``batches`` carries every state change of a batch in one row, so completing a batch is
  one UPDATE however many URLs it holds.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pairfarm.protocol import BatchStatus, RobotsKind, Role

NAMING = {
    "ix": "%(table_name)s_%(column_0_N_name)s_idx",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}


def _in(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Token(Base):
    """An API bearer token; only its sha256 is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    role: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    token_sha256: Mapped[bytes] = mapped_column(LargeBinary, nullable=False, unique=True)
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (CheckConstraint(_in("role", [r.value for r in Role]), name="role"),)


class Worker(Base):
    """A client of the API: one per token, updated on register and on every lease."""

    __tablename__ = "workers"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"), nullable=False, unique=True)
    role: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    version: Mapped[str | None] = mapped_column(Text)
    registered_at: Mapped[datetime] = _now()
    last_seen_at: Mapped[datetime] = _now()
    #: failures reported with no completion in between, and when that run began
    failures_in_row: Mapped[int] = mapped_column(SmallInteger, nullable=False,
                                                 server_default="0")
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: no lease for this client until then (its run of failures reached the limit)
    quarantined_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    quarantine_reason: Mapped[str | None] = mapped_column(Text)


class Ingest(Base):
    """One ingested file and its summary; ``candidates.ingest_id`` names the source."""

    __tablename__ = "ingests"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    rows_read: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    inserted: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    duplicates: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    rejected: Mapped[dict[str, int]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    started_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Candidate(Base):
    """A (URL, caption) pair as ingested; its lease state is in ``pending_chunks`` /
    ``batch_members``."""

    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    #: no index: the dedup is ``url_hashes``. "C" collation: compares bytes, whatever the
    #: database's locale
    url: Mapped[str] = mapped_column(Text(collation="C"), nullable=False)
    caption: Mapped[str] = mapped_column(Text, nullable=False)
    language: Mapped[str | None] = mapped_column(Text)
    ingest_id: Mapped[int | None] = mapped_column(Integer)
    #: ``json``, not ``jsonb``: the ingest writes the loader's text as it is and the lease
    #: reads it back into its JSON body; no statement looks inside
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class UrlHash(Base):
    """The exact URL dedup: one row per URL ever ingested, never archived, so a URL whose
    candidate has left ``candidates`` still counts as a duplicate.

    ``h`` is the first 16 bytes of the SHA-256 of the cleaned URL's UTF-8 bytes
    (``coordinator.ingest.urlhash.url_hash``; in SQL ``encode(substr(sha256(convert_to(url,
    'UTF8')), 1, 16), 'hex')::uuid``), stored as ``uuid``: 16 bytes, compared with
    ``memcmp``. The ingest inserts a chunk's hashes with ``ON CONFLICT DO NOTHING`` and
    loads only the rows whose hash went in, so the first URL ingested wins.

    Collisions: with n distinct URLs the chance that two share a hash is about
    n^2 / 2^129, ~5e-20 at 5.85 billion. If it happens, the later URL counts as a
    duplicate and is not ingested.
    """

    __tablename__ = "url_hashes"
    h: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)


class UrlWave(Base):
    """A wave of the URL dedup (``coordinator.ingest.waves``): ``url_hashes`` holds the
    current wave's hashes (the row whose ``frozen_at`` is NULL); a frozen wave's are in
    ``url_hashes_w<wave>``, never written again, and ``bloom`` is their split-block Bloom
    filter (``coordinator.ingest.bloom``), 2 bytes a hash, stored uncompressed."""

    __tablename__ = "url_waves"
    __table_args__ = (
        CheckConstraint("(frozen_at IS NULL) = (bloom IS NULL)", name="frozen_with_bloom"),
    )
    wave: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: the wave's hashes: counted by each file's end while current, exact once frozen
    hashes: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    frozen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    bloom: Mapped[bytes | None] = mapped_column(LargeBinary)


#: pending candidate ids a pending_chunks row holds (fewer in the last chunk of an insert)
CHUNK_SIZE = 16


class PendingChunk(Base):
    """Up to ``CHUNK_SIZE`` candidates no batch holds yet; the row is deleted when a
    batch takes it (the chunk that crosses the batch size is split: its rest goes back as
    a new row with its fragments).

    The ingest fills each chunk with 16 consecutive ids and their lease payload: the
    candidates' fields as JSON array fragments (``url_j`` ...), so forming a batch reads
    only this table. A page holds 43 rows without fragments, 2-4 with LAION-like ones; a
    10k batch locks and deletes ~625 rows (~1.3k WAL records; 20k when each candidate had
    its own row). A writer that changes a row's ``ids`` must clear its fragments (NULL:
    the lease reads those candidates' rows).
    """

    __tablename__ = "pending_chunks"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False)
    #: the lease payload (``coordinator.payload``): the candidates' fields as JSON array
    #: fragments in the order of ``ids``, written by the ingest; NULL when the chunk
    #: carries none and the lease reads its ``candidates`` rows
    url_j: Mapped[str | None] = mapped_column(Text)
    caption_j: Mapped[str | None] = mapped_column(Text)
    language_j: Mapped[str | None] = mapped_column(Text)
    extra_j: Mapped[str | None] = mapped_column(Text)


class BatchMembers(Base):
    """The candidate ids of a batch, one array (80 kB for 10k ids, stored uncompressed:
    ``STORAGE EXTERNAL`` in the migration) per batch, written when the batch is formed and
    read when it is (re-)leased. The elements have no foreign key to ``candidates``: the
    lease statement that fills the array takes them from ``pending_chunks``."""

    __tablename__ = "batch_members"
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), primary_key=True,
                                          autoincrement=False)
    ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False)
    #: each member's attempt (element i is ``ids[i]``'s); NULL: all first attempts
    attempts: Mapped[list[int] | None] = mapped_column(ARRAY(SmallInteger))


class Batch(Base):
    """A batch of candidates and its whole life: leases, shard, outcome counts."""

    __tablename__ = "batches"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    #: the current lease holder (download worker, then post-processing node)
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id"))
    lease_token: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="0")
    pp_attempts: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    #: the client of the batch's last lease, kept when the lease ends
    last_worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id"))
    downloaded_by: Mapped[int | None] = mapped_column(ForeignKey("workers.id"))
    shard: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    tar_sha256: Mapped[str | None] = mapped_column(Text)
    outcomes: Mapped[dict[str, int] | None] = mapped_column(JSONB)
    bytes_downloaded: Mapped[int | None] = mapped_column(BigInteger)
    download_s: Mapped[float | None] = mapped_column(Float)
    download_digest: Mapped[str | None] = mapped_column(Text)
    postprocess: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    kept: Mapped[int | None] = mapped_column(Integer)
    dropped: Mapped[int | None] = mapped_column(Integer)
    postprocess_digest: Mapped[str | None] = mapped_column(Text)
    #: candidates sent back for a later attempt at completion (``RetryChunk``): they left
    #: the batch's members and size, and its ``outcomes`` do not count them
    retried: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _now()
    leased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    downloaded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint(_in("status", [s.value for s in BatchStatus]), name="status"),
        CheckConstraint(
            "(status IN ('leased', 'postprocessing')) = (lease_token IS NOT NULL)",
            name="lease_token",
        ),
        Index("batches_pending", "id", postgresql_where=text("status = 'pending'")),
        Index("batches_downloaded", "id", postgresql_where=text("status = 'downloaded'")),
        Index("batches_leased_expiry", "lease_expires_at",
              postgresql_where=text("status IN ('leased', 'postprocessing')")),
        Index("batches_worker_id_idx", "worker_id"),
    )


class RetryChunk(Base):
    """Up to 1,000 candidates a completion sent back for a later attempt because their
    outcome was transient (``pairfarm.outcomes.TRANSIENT``), all at the same ``attempt``
    (2 for the first retry) and due at ``not_before``; ids in id order. A lease takes
    whole due rows and deletes them (the row that crosses the batch size is split, its
    rest goes back as a new row), so a retried candidate costs a share of one row, not a
    row and its index entries. A candidate is in a retry chunk or in one batch's
    members, never both."""

    __tablename__ = "retry_chunks"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    attempt: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False)
    __table_args__ = (Index("retry_chunks_due", "not_before"),)


# -- the archive (``coordinator.archive``): finished batches moved out to parquet files ---

class Archive(Base):
    """One parquet file of archived candidates, recorded in the transaction that deleted
    its batches from the hot tables: a file without its row is garbage (a run that died
    before its commit), removed by the next run."""

    __tablename__ = "archives"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    #: the folder (a local path or an fsspec URL such as s3://bucket/archive) and the
    #: file's name in it
    directory: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    first_batch_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_batch_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    batches: Mapped[int] = mapped_column(Integer, nullable=False)
    candidates: Mapped[int] = mapped_column(BigInteger, nullable=False)
    file_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _now()
    __table_args__ = (UniqueConstraint("directory", "name"),)


class ArchivedTotals(Base):
    """What the archived batches of one final status add to the farm's totals
    (``downloaded`` is final in a farm without post-processing: ``--archive-downloaded``)."""

    __tablename__ = "archived_totals"
    status: Mapped[str] = mapped_column(Text, primary_key=True)
    batches: Mapped[int] = mapped_column(BigInteger, nullable=False)
    candidates: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bytes_downloaded: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kept: Mapped[int] = mapped_column(BigInteger, nullable=False)
    dropped: Mapped[int] = mapped_column(BigInteger, nullable=False)
    retried: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    #: the earliest ``created_at`` of these batches (the farm's age, for the rate's span)
    first_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint("status IN ('done', 'failed', 'downloaded')", name="status"),)


class ArchivedOutcome(Base):
    """URLs of the archived batches' download reports, by outcome class."""

    __tablename__ = "archived_outcomes"
    outcome: Mapped[str] = mapped_column(Text, primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ArchivedMinute(Base):
    """Candidates and ok samples of the archived batches whose download completed in each
    minute (the dashboard's throughput chart)."""

    __tablename__ = "archived_minutes"
    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    candidates: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ok: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ArchivedWorkerDownloads(Base):
    """Candidates each download worker completed in the archived batches."""

    __tablename__ = "archived_worker_downloads"
    worker_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    candidates: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ArchivedSimilarity(Base):
    """The archived post-processing reports' similarity histograms, summed bin by bin for
    each set of edges (``bin`` counts from 1, as ``WITH ORDINALITY``)."""

    __tablename__ = "archived_similarity"
    edges: Mapped[Any] = mapped_column(JSONB, primary_key=True)
    bin: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    samples: Mapped[int] = mapped_column(BigInteger, nullable=False)


# -- robots.txt answers shared by the download workers (``coordinator.robots``) ---------

class RobotsTxt(Base):
    """One origin's robots.txt as a worker fetched it (``pairfarm.protocol.RobotsEntry``),
    served to the other workers until ``expires_at``."""

    __tablename__ = "robots_txt"
    #: ``scheme://host[:port]``
    origin: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    #: the HTTP status of the answer (0: the host could not be reached)
    status: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    #: the rule lines (user-agent, allow, disallow); empty unless ``kind`` is ``rules``
    body: Mapped[str] = mapped_column(Text, nullable=False)
    fetched_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (
        CheckConstraint(_in("kind", [k.value for k in RobotsKind]), name="kind"),
        Index("robots_txt_expires_at_idx", "expires_at"),
    )
