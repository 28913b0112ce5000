"""Batch leases: forming batches with TABLESAMPLE, heartbeats, completion, failure, reaping.

Every operation is one short transaction of O(1) statements, whatever the batch size.

Forming a download batch (``lease_download``):

A lease-ahead (``ahead``: the worker still holds a batch) is granted only while something
is left after it (``anything_left``): the last batch of the queue goes to a worker with
nothing in hand, not behind the tail of a busy one.

1. re-lease the oldest ``pending`` batch (one that expired or was given back) with the
   same id and the same candidates, so its shard names stay stable;
2. else create a batch and fill it from ``pending_chunks`` in one statement
   (``claim_sampled``): sample pages with ``TABLESAMPLE SYSTEM (p)`` at a rate adapted
   to the yield of earlier samples and to the width of the rows (``oversample`` times the
   chunks needed, and pages enough that a batch takes at most ``page_share`` chunks from
   each: ``coordinator.sampling``), shuffle the sampled chunks, lock enough of them for
   the batch with ``FOR UPDATE SKIP LOCKED`` (chunks a concurrent lease holds or took
   are passed over, and the rest of the sample stands in for them), delete whole chunks
   while they fit and split the one that crosses the batch size (its rest goes back as
   a new chunk);
3. when the sample comes back short (or would be too costly), top it up from the
   primary key of ``pending_chunks`` starting at a random id, again ``SKIP LOCKED``.

The body: each chunk carries its candidates' fields as JSON array fragments (written
by the ingest); the claim's ``DELETE ... RETURNING`` hands them over and the lease joins
them (``coordinator.payload``), so forming a batch reads no ``candidates`` row. Retried
candidates and chunks without fragments are read from ``candidates`` in one statement
(``candidate_fragments``). The batch's ``batch_members`` row is written once, in the
body's order (``store_members``); a re-leased batch (step 1) reads all its candidates in
that order (``batch_candidates``), so each keeps its key.

URL retries: a new batch first takes candidates that wait for a retry and are due
(``claim_retries``: whole ``retry_chunks`` rows by their ``not_before`` index, ``SKIP
LOCKED``, the crossing row split as pending chunks are), at most ``RETRY_SHARE`` of the
batch while new candidates remain (retries crowd on the hosts that failed, and the
sampled rest keeps the batch spread like the input), then more of them when
``pending_chunks`` runs short. The batch's members keep each one's attempt
(``batch_members.attempts``); the lease tells the worker each candidate's attempt and
``url_retries``. A completion whose report names candidates to retry (their outcome
transient, their attempt <= ``url_retries``) sends them back in its own transaction,
after the fence (``queue_retries``): they leave the batch's members, size and outcome
counts (the batch counts them in ``retried``) and wait ``url_retry_delay_s`` x
``url_retry_growth`` ^ (attempt - 1) in retry chunks of up to ``RETRY_CHUNK_IDS`` (one
row and one index entry for hundreds of candidates). A report asking to retry a
candidate that is not in the batch or at its last attempt is refused whole.

A candidate leaves ``pending_chunks`` with the delete of its chunk, which succeeds once:
no two batches can hold it. Sampling and claiming read and write only ``pending_chunks``
(~625 rows for a 10k batch) and one ``batch_members`` row.

Fencing: heartbeat, complete and fail name the batch, the caller (``worker_id``, from its
bearer token) and the lease token. Anything else than "leased to this caller under this
token" raises ``LeaseConflict`` and changes nothing; a repeated completion with the same
report is recognised by its digest and answered with the batch's current state.

An empty queue (``_EmptyQueue``): once a lease found nothing to lease, this process
answers "nothing" without a transaction for ``empty_hold_s``, so that thousands of idle
workers polling an empty farm cost a request each, not a lease transaction each. It
forgets that at once when this process gives a batch back (``fail``), reaps a lease or
sends URLs back for a retry; what another process or an ingest adds is seen at most
``empty_hold_s`` late. A quarantined worker asking meanwhile gets "nothing" instead of
``Quarantined`` (it is refused on its next lease that looks). In the same way, once a
lease's sample and its walk of the whole ``pending_chunks`` index found no candidate,
this process's leases take due retries only for ``empty_hold_s`` (``_no_pending``).

Resource handling: each call borrows one pooled connection for one transaction.
Quarantine: a download worker whose failure reports (not releases) come
``quarantine_after`` in a row, with no completion in between, within
``quarantine_window_s``, gets ``Quarantined`` instead of a lease for ``quarantine_s``.

Error handling: ``LeaseConflict`` / ``NotFound`` / ``InvalidReport`` / ``Quarantined``; driver
errors pass through as SQLAlchemy errors (the API maps them to 503).
"""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from coordinator import reports
from coordinator.errors import LeaseConflict, NotFound, Quarantined
from coordinator.models import CHUNK_SIZE
from coordinator.payload import Part, attempts_text, count_of, lease_body, members_text
from coordinator.queries import Q, int_array, text_array
from coordinator.sampling import SampleRate
from coordinator.settings import LeaseSettings
from pairfarm.protocol import (
    BatchState,
    BatchStatus,
    DownloadLease,
    DownloadReport,
    FailCause,
    FailReport,
    HeartbeatResponse,
    LeaseInfo,
    PostprocessLease,
    PostprocessReport,
    ShardFiles,
)

if TYPE_CHECKING:
    from prometheus_client import Counter

    from coordinator.metrics import CoordinatorMetrics

DOWNLOAD = "download"
POSTPROCESS = "postprocess"
#: the status a batch has while each kind of client holds it, and where it goes back to
HELD = {DOWNLOAD: BatchStatus.LEASED, POSTPROCESS: BatchStatus.POSTPROCESSING}
BACK_TO = {DOWNLOAD: BatchStatus.PENDING, POSTPROCESS: BatchStatus.DOWNLOADED}
#: which kind of client holds a batch in each held status
KIND_HOLDING = {status.value: kind for kind, status in HELD.items()}
TABLE_STATS_MAX_AGE_S = 10.0
#: the bytes of a page that hold rows (8 kB less the page header)
PAGE_BYTES = 8168
#: a row's bytes beside its columns: tuple header and line pointer
ROW_OVERHEAD = 28
#: full pending_chunks rows of 16 ids without fragments (~188 bytes with their line
#: pointer) in an 8 kB page: the density assumed until a claim measured the rows
PAGE_ROWS = 43
#: rounds of the index fallback (each learns how full the chunks are)
INDEX_ROUNDS = 8
#: while new candidates remain, at most this share of a new batch (at least one) is
#: candidates due for a retry
RETRY_SHARE = 0.25
#: the most candidates a completion puts in one retry chunk (8 kB of ids: the row stays
#: inline, ``toast_tuple_target`` 8160)
RETRY_CHUNK_IDS = 1000
#: rounds of ``claim_retries`` for one batch (each locks the chunks the learned average
#: size says it needs, and one more)
RETRY_ROUNDS = 4


def new_lease_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class RawDownloadLease:
    """A download lease whose candidates are still the JSON array the database built."""

    info: LeaseInfo
    count: int
    candidates: str
    url_retries: int = 0

    def to_json(self) -> str:
        """The ``DownloadLease`` body: the lease fields with the candidates spliced in."""
        head = self.info.model_dump_json()
        return (f'{head[:-1]},"url_retries":{int(self.url_retries)},'
                f'"candidates":{self.candidates}}}')


@dataclass(frozen=True)
class Expired:
    """A lease the reaper took back: the batch, its new status, the kind of lease."""

    batch_id: int
    status: str
    kind: str


@dataclass(frozen=True)
class FormStats:
    """How a new batch was filled (for tests and the benchmark)."""

    sampled: int
    from_sample: int
    from_index: int


@dataclass(frozen=True)
class TableSize:
    """Planner statistics of ``pending_chunks``: rows and pages."""

    rows: int
    pages: int


class _TableRows:
    """The size of ``pending_chunks`` from planner statistics, cached for a few
    seconds."""

    def __init__(self) -> None:
        self._size = TableSize(0, 0)
        self._at = float("-inf")
        self._max_id = 0
        self._max_at = float("-inf")

    def max_id(self, conn: sa.Connection) -> int:
        """The largest chunk id, cached as long: it only places the index fallback's
        random start, and a walk from a start past the end wraps to 0. (Read fresh, it
        walks the primary key back past the entries of the chunks deleted since the last
        vacuum: ~3,300 blocks a call in a drain of 40M.)"""
        if time.monotonic() - self._max_at > TABLE_STATS_MAX_AGE_S:
            self._max_id = int(conn.execute(Q.max_chunk_id).scalar_one())
            self._max_at = time.monotonic()
        return self._max_id

    def get(self, conn: sa.Connection) -> TableSize:
        if time.monotonic() - self._at > TABLE_STATS_MAX_AGE_S:
            row = conn.execute(Q.table_size_estimate).one()
            rows = int(row.rows)
            if rows < 0:  # never analyzed: the id range bounds the row count
                rows = int(conn.execute(Q.max_chunk_id).scalar_one())
            self._size = TableSize(rows, int(row.pages))
            self._at = time.monotonic()
        return self._size


class _ChunkFill:
    """How many ids the pending chunks hold on average, learned from the last claim
    (full chunks hold ``CHUNK_SIZE``; leftovers and the last chunk of an insert fewer),
    and how many chunks a full page holds, from the bytes of the rows it took (rows with
    fragments are ~10-40 times as wide as rows of ids alone)."""

    def __init__(self, ids_per_chunk: float = CHUNK_SIZE) -> None:
        self.ids_per_chunk = float(ids_per_chunk)
        self.page_rows = PAGE_ROWS

    def chunks_for(self, ids: int) -> int:
        return max(1, math.ceil(ids / self.ids_per_chunk))

    def capacity(self, size: TableSize) -> int:
        """The chunks the table's pages hold when full (what a sample's pages cost)."""
        return size.pages * self.page_rows

    def observe(self, chunks: int, ids: int, row_bytes: float | None = None) -> None:
        if chunks > 0:
            self.ids_per_chunk = max(1.0, ids / chunks)
        if row_bytes:
            self.page_rows = max(1, int(PAGE_BYTES // (float(row_bytes) + ROW_OVERHEAD)))


class _EmptyQueue:
    """Whether a lease of this process found the queue empty less than ``hold_s`` ago,
    with nothing given back, reaped or re-queued here since."""

    def __init__(self, hold_s: float, clock: Callable[[], float]) -> None:
        self._hold_s = hold_s
        self._clock = clock
        self._until = float("-inf")

    def holds(self) -> bool:
        return self._clock() < self._until

    def seen(self) -> None:
        if self._hold_s > 0:
            self._until = self._clock() + self._hold_s

    def forget(self) -> None:
        self._until = float("-inf")


class Leases:
    """The lease operations of both kinds of client, on one engine."""

    def __init__(self, engine: sa.Engine, settings: LeaseSettings,
                 metrics: CoordinatorMetrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.rate = SampleRate(oversample=settings.oversample,
                               max_rows=settings.max_sample_rows // CHUNK_SIZE,
                               page_share=settings.page_share)
        self._rows = _TableRows()
        self._fill = _ChunkFill()
        #: the ids a retry chunk held on average in the last claim that took whole ones
        self._retry_fill = _ChunkFill(ids_per_chunk=100.0)
        self._empty = _EmptyQueue(settings.empty_hold_s, clock)
        #: a lease found no pending candidate, sampled or by the index (only due retries
        #: may be left)
        self._no_pending = _EmptyQueue(settings.empty_hold_s, clock)
        self.last_form: FormStats | None = None
        #: the last batch this process formed came out full: the queue is not empty, so
        #: the next lease skips the ``anything_to_form`` probe (which costs an index walk
        #: past the chunks deleted since the last vacuum) and forms at once
        self._formed_full = False

    # -- download ---------------------------------------------------------------------
    def lease_download(self, worker_id: int, max_size: int | None = None, *,
                       ahead: bool = False) -> DownloadLease | None:
        """Lease a batch of candidates to ``worker_id``; None when nothing is left, or
        (``ahead``: the worker still holds a batch) when this one would be the last."""
        raw = self.lease_download_raw(worker_id, max_size, ahead=ahead)
        return None if raw is None else DownloadLease.model_validate_json(raw.to_json())

    def lease_download_raw(self, worker_id: int, max_size: int | None = None, *,
                           ahead: bool = False) -> RawDownloadLease | None:
        """``lease_download`` with the candidates left as the JSON the database built."""
        if self._empty.holds():
            self._count_empty("held")
            return None
        size = min(max_size or self.settings.batch_size, self.settings.batch_size)
        params = self._lease_params(worker_id)
        with self.engine.begin() as conn:
            _check_quarantine(conn, worker_id)
            row = conn.execute(Q.lease_pending_batch, {**params, "max_size": size}).first()
            if row is not None:
                found = conn.execute(Q.batch_candidates, {"batch_id": row.id}).one()
                count, body = int(found.n), str(found.candidates)
            else:
                if not self._formed_full and not _anything_to_form(conn):
                    self._nothing_found()
                    return None
                row = conn.execute(Q.insert_leased_batch, params).one()
                parts = self._fill_batch(conn, row.id, size)
                count = count_of(parts)
                self._formed_full = count >= size
                if not count:
                    conn.rollback()
                    self._nothing_found()
                    return None
                conn.execute(Q.store_members, {"batch_id": row.id, "size": count,
                                               "ids": members_text(parts),
                                               "attempts": attempts_text(parts)})
                body = lease_body(parts)
            if ahead and not conn.execute(Q.anything_left).scalar_one():
                conn.rollback()  # the last batch: kept for a worker with nothing in hand
                return None
            self._count("leases", DOWNLOAD)
            info = LeaseInfo(batch_id=row.id, lease_token=row.lease_token,
                             lease_expires_at=row.lease_expires_at, attempt=row.attempts)
            return RawDownloadLease(info=info, count=count, candidates=body,
                                    url_retries=self.settings.url_retries)

    def _fill_batch(self, conn: sa.Connection, batch_id: int, want: int) -> list[Part]:
        """Fill a new batch: due retries (at most ``RETRY_SHARE`` of it), new candidates,
        then more due retries when the new ones ran short; the body's parts."""
        claim = _Claim()
        self._claim_retries(conn, max(1, int(want * RETRY_SHARE)), claim)
        if claim.count < want:
            self._form(conn, batch_id, want - claim.count, claim)
        if claim.count < want:
            self._claim_retries(conn, want - claim.count, claim)
        if claim.to_read:
            ids, attempts = claim.read_arrays()
            row = conn.execute(Q.candidate_fragments, {"ids": ids, "attempts": attempts}).one()
            claim.parts.append(Part(int(row.n), row.id_j, row.url_j, row.caption_j,
                                    row.language_j, row.extra_j, row.attempt_j))
        return claim.parts

    def _claim_retries(self, conn: sa.Connection, want: int, claim: _Claim) -> None:
        """Take up to ``want`` due retries, in rounds while whole chunks keep coming."""
        for _ in range(RETRY_ROUNDS):
            if want < 1:
                return
            chunks = self._retry_fill.chunks_for(want) + 1
            row = conn.execute(Q.claim_retries, {"n": want, "chunks": chunks}).one()
            got = int(row.n)
            if got:
                claim.read(row.id_j, row.attempt_j, got)
                self._retry_fill.observe(int(row.chunks), got)
            if int(row.chunks) < chunks:  # no more due chunks (or all others locked)
                return
            want -= got

    def _form(self, conn: sa.Connection, batch_id: int, want: int, claim: _Claim) -> None:
        """Fill batch ``batch_id`` with up to ``want`` pending candidates (none while a
        lease of this process found no pending candidate at all, in its sample and its
        walk of the whole index, less than ``empty_hold_s`` ago: a lease then takes due
        retries only)."""
        if self._no_pending.holds():
            self.last_form = FormStats(0, 0, 0)
            return
        size = self._rows.get(conn)
        chunks = self._fill.chunks_for(want)
        pct = self.rate.percent(chunks, size.rows, self._fill.capacity(size),
                                self._fill.page_rows)
        claimed = sampled = 0
        if pct is not None:
            row = conn.execute(Q.claim_sampled, {
                "pct": pct, "chunks": chunks, "n": want, "batch_id": batch_id}).one()
            claimed, sampled = claim.took(row), int(row.sampled)
            self.rate.observe(pct, size.rows, sampled)
            self._fill.observe(int(row.chunks), int(row.ids), row.row_bytes)
        else:
            self.rate.used_index()
        from_index = (self._claim_by_index(conn, batch_id, want - claimed, claim)
                      if claimed < want else 0)
        if claimed + from_index == 0:  # neither the sample nor the whole index had one
            self._no_pending.seen()
        self.last_form = FormStats(sampled, claimed, from_index)

    def _claim_by_index(self, conn: sa.Connection, batch_id: int, want: int,
                        claim: _Claim) -> int:
        """Take ``want`` candidates from chunks in id order from a random id, wrapping
        around once; each round asks for as many chunks as the fill learned so far needs."""
        start = random.randint(0, self._rows.max_id(conn))
        got = 0
        for _ in range(INDEX_ROUNDS):
            if got >= want:
                break
            chunks = self._fill.chunks_for(want - got)
            row = conn.execute(Q.claim_by_index, {
                "start": start, "chunks": chunks, "n": want - got,
                "batch_id": batch_id}).one()
            got += claim.took(row)
            self._fill.observe(int(row.chunks), int(row.ids), row.row_bytes)
            if int(row.chunks) < chunks:  # the index ran out from ``start``
                if start == 0:
                    break
                start = 0
        return got

    def complete_download(self, batch_id: int, worker_id: int,
                          report: DownloadReport) -> BatchState:
        digest = reports.digest(report)
        with self.engine.begin() as conn:
            batch = _lock(conn, batch_id)
            if batch.download_digest == digest:
                return _state(batch)
            _fence(batch, DOWNLOAD, worker_id, report.lease_token)
            reports.check_download(report, batch.size)
            sent_back = self._queue_retries(conn, batch_id, report)
            retried = sum(sent_back.values())
            if retried:
                self._empty.forget()
            row = conn.execute(Q.complete_download, {
                "batch_id": batch_id, "worker_id": worker_id,
                "lease_token": report.lease_token,
                "shard": report.shard.model_dump_json(), "tar_sha256": report.shard.tar_sha256,
                "outcomes": json.dumps(reports.final_outcomes(report.outcomes, sent_back)),
                "size": batch.size - retried, "retried": retried,
                "bytes_downloaded": report.bytes_downloaded,
                "duration_s": report.duration_s, "digest": digest,
            }).one()
            conn.execute(Q.worker_completed, {"worker_id": worker_id})
            self._count("completions", DOWNLOAD)
            return BatchState(batch_id=row.id, status=row.status, attempts=row.attempts)

    def _queue_retries(self, conn: sa.Connection, batch_id: int,
                       report: DownloadReport) -> dict[str, int]:
        """Send the report's retries back for a later batch; how many by outcome class.
        ``InvalidReport`` (the transaction rolls back) unless every one could be."""
        ids, classes = reports.retry_columns(report)
        if not ids:
            return {}
        s = self.settings
        row = conn.execute(Q.queue_retries, {
            "batch_id": batch_id, "ids": int_array(ids), "classes": text_array(classes),
            "max_retries": s.url_retries, "delay": s.url_retry_delay_s,
            "growth": s.url_retry_growth, "chunk_ids": RETRY_CHUNK_IDS}).one()
        sent_back: dict[str, int] = json.loads(row.queued)
        reports.check_retries(asked=len(ids), members=int(row.members),
                              sent_back=sum(sent_back.values()), url_retries=s.url_retries)
        return sent_back

    # -- post-processing --------------------------------------------------------------
    def lease_postprocess(self, worker_id: int) -> PostprocessLease | None:
        with self.engine.begin() as conn:
            row = conn.execute(Q.lease_downloaded_batch, self._lease_params(worker_id)).first()
            if row is None:
                return None
            self._count("leases", POSTPROCESS)
            ok = int((row.outcomes or {}).get("ok", 0))
            return PostprocessLease(
                batch_id=row.id, lease_token=row.lease_token,
                lease_expires_at=row.lease_expires_at, attempt=row.attempts,
                shard=ShardFiles.model_validate(row.shard), count=ok)

    def complete_postprocess(self, batch_id: int, worker_id: int,
                             report: PostprocessReport) -> BatchState:
        digest = reports.digest(report)
        with self.engine.begin() as conn:
            batch = _lock(conn, batch_id)
            if batch.postprocess_digest == digest:
                return _state(batch)
            _fence(batch, POSTPROCESS, worker_id, report.lease_token)
            reports.check_postprocess(report, batch.outcomes)
            row = conn.execute(Q.complete_postprocess, {
                "batch_id": batch_id, "worker_id": worker_id,
                "lease_token": report.lease_token,
                "report": report.model_dump_json(exclude={"lease_token"}),
                "kept": report.kept, "dropped": report.dropped, "digest": digest,
            }).one()
            self._count("completions", POSTPROCESS)
            return BatchState(batch_id=row.id, status=row.status, attempts=row.attempts)

    # -- both kinds ---------------------------------------------------------------------
    def heartbeat(self, kind: str, batch_id: int, worker_id: int,
                  lease_token: str) -> HeartbeatResponse:
        with self.engine.begin() as conn:
            row = conn.execute(Q.heartbeat, {
                "batch_id": batch_id, "status": HELD[kind].value, "worker_id": worker_id,
                "lease_token": lease_token, "ttl": self.settings.lease_ttl_s}).first()
            if row is None:
                _fence(_lock(conn, batch_id), kind, worker_id, lease_token)
                raise LeaseConflict(f"batch {batch_id} is not leased to you")
            return HeartbeatResponse(lease_expires_at=row.lease_expires_at)

    def fail(self, kind: str, batch_id: int, worker_id: int, report: FailReport) -> BatchState:
        """Give a batch back: a ``release`` or a failure whose cause is the worker's own
        refunds the attempt; otherwise it counts, and the batch fails for good once
        ``max_attempts`` are spent."""
        refunded = report.release or report.cause is FailCause.WORKER
        with self.engine.begin() as conn:
            batch = _lock(conn, batch_id)
            _fence(batch, kind, worker_id, report.lease_token)
            spent = batch.attempts if kind == DOWNLOAD else batch.pp_attempts
            refund = 1 if refunded else 0
            row = conn.execute(Q.give_back, {
                "batch_id": batch_id, "status": HELD[kind].value, "worker_id": worker_id,
                "lease_token": report.lease_token, "back_to": BACK_TO[kind].value,
                "exhausted": not refunded and spent >= self.settings.max_attempts,
                "refund": refund if kind == DOWNLOAD else 0,
                "pp_refund": refund if kind == POSTPROCESS else 0,
                "reason": f"{kind} {_failure_kind(report)}: {report.reason}",
            }).one()
            if kind == DOWNLOAD and not report.release:
                self._count_failure(conn, worker_id, report.reason)
            self._count("failures", kind)
            self._empty.forget()
            return BatchState(batch_id=row.id, status=row.status, attempts=row.attempts)

    def _count_failure(self, conn: sa.Connection, worker_id: int, reason: str) -> None:
        """One more failure in the worker's run; quarantined when the run is long enough."""
        s = self.settings
        conn.execute(Q.worker_failed, {
            "worker_id": worker_id, "window": s.quarantine_window_s,
            "after": s.quarantine_after, "quarantine": s.quarantine_s,
            "reason": reason[:500]})

    def reap(self) -> list[tuple[int, str]]:
        """Return expired leases to the queue (or fail them); the (id, new status) pairs."""
        return [(e.batch_id, e.status) for e in self.reap_expired()]

    def reap_expired(self) -> list[Expired]:
        """``reap``, saying also which kind of lease each batch held. A pass finds
        nothing while another process's pass holds the reaper's advisory lock."""
        with self.engine.begin() as conn:
            if not conn.execute(Q.reap_lock).scalar_one():
                return []
            rows = conn.execute(Q.reap_expired, {"max_attempts": self.settings.max_attempts})
            expired = [Expired(r.id, r.status, KIND_HOLDING[r.held]) for r in rows]
        if expired:
            self._empty.forget()
        return expired

    def _count(self, counter: str, kind: str) -> None:
        """Count one event of ``kind`` in the metrics' counter of that name, if any."""
        if self.metrics is not None:
            metric: Counter = getattr(self.metrics, counter)
            metric.labels(kind=kind).inc()

    def _nothing_found(self) -> None:
        self._formed_full = False
        self._empty.seen()
        self._count_empty("looked")

    def _count_empty(self, answered: str) -> None:
        if self.metrics is not None:
            self.metrics.empty_leases.labels(answered=answered).inc()

    def _lease_params(self, worker_id: int) -> dict[str, Any]:
        return {"worker_id": worker_id, "lease_token": new_lease_token(),
                "ttl": self.settings.lease_ttl_s}


class _Claim:
    """What the claims of one new batch took: the body's parts that came with
    fragments, the candidates that must be read (the ids of chunks without fragments,
    at their first attempt, and due retries) as comma-separated ids and attempts, how
    many in all."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._read_ids: list[str] = []
        self._read_attempts: list[str] = []
        self.count = 0

    @property
    def to_read(self) -> bool:
        return bool(self._read_ids)

    def read_arrays(self) -> tuple[str, str]:
        """The candidates to read and their attempts, as PostgreSQL array texts."""
        return ("{" + ",".join(self._read_ids) + "}",
                "{" + ",".join(self._read_attempts) + "}")

    def took(self, row: sa.Row[Any]) -> int:
        """Add a claim statement's result (``claim_sampled``, ``claim_by_index``); how
        many candidates it stored."""
        if int(row.carried):
            self.parts.append(Part(int(row.carried), row.id_j, row.url_j, row.caption_j,
                                   row.language_j, row.extra_j))
        if row.read_ids:
            self._read(int_array(row.read_ids)[1:-1], ",".join(["1"] * len(row.read_ids)))
        self.count += int(row.n)
        return int(row.n)

    def read(self, id_j: str, attempt_j: str, count: int) -> None:
        """Add ``count`` due retries (``claim_retries``' comma-separated ids and attempts)."""
        self._read(id_j, attempt_j)
        self.count += count

    def _read(self, id_j: str, attempt_j: str) -> None:
        self._read_ids.append(id_j)
        self._read_attempts.append(attempt_j)


def _failure_kind(report: FailReport) -> str:
    """How ``last_error`` names a given-back batch (``pairfarm batches requeue --reason``
    matches it)."""
    if report.release:
        return "released"
    if report.cause is FailCause.WORKER:
        return "failed on the worker (no attempt spent)"
    return "failed"


def _anything_to_form(conn: sa.Connection) -> bool:
    """Whether a new batch could get a candidate: a pending chunk or a due retry (no
    pending batch that fits is left: ``lease_pending_batch`` just found none). It reads without
    locks, so a concurrent lease or completion can change the answer right after: a
    false "nothing" costs the worker one idle poll (it asks again), a false "something"
    takes the full path, which forms nothing and rolls back, as before this check."""
    return bool(conn.execute(Q.anything_to_form).scalar_one())


def _check_quarantine(conn: sa.Connection, worker_id: int) -> None:
    row = conn.execute(Q.worker_quarantine, {"worker_id": worker_id}).first()
    if row is not None:
        left = float(row.seconds_left)
        raise Quarantined(f"this worker is quarantined for {left:.0f} s more: {row.reason}",
                          left)


def _lock(conn: sa.Connection, batch_id: int) -> sa.Row[Any]:
    batch = conn.execute(Q.lock_batch, {"batch_id": batch_id}).first()
    if batch is None:
        raise NotFound(f"no batch {batch_id}")
    return batch


def _fence(batch: sa.Row[Any], kind: str, worker_id: int, lease_token: str) -> None:
    if batch.status != HELD[kind].value:
        raise LeaseConflict(f"batch {batch.id} is {batch.status}, not {HELD[kind].value}")
    if batch.worker_id != worker_id:
        raise LeaseConflict(f"batch {batch.id} is leased to another client")
    if not secrets.compare_digest(batch.lease_token or "", lease_token):
        raise LeaseConflict(f"batch {batch.id}: wrong lease token (an older lease?)")


def _state(batch: sa.Row[Any]) -> BatchState:
    return BatchState(batch_id=batch.id, status=batch.status, attempts=batch.attempts)
