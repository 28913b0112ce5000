"""What crosses the wire between the coordinator and its clients (API v1).

Every request and response body of the coordinator's REST API is one of these models.
The coordinator, the download worker and the post-processing node all import them from
here, so that the three sides cannot disagree. Only pydantic is imported.

Endpoints (all under ``API_PREFIX``; bearer token in ``Authorization``):

====================================  =======  ==========================================
path                                  role     body -> response
====================================  =======  ==========================================
``POST /register``                    any      RegisterRequest -> RegisterResponse
``POST /download/lease``              worker   LeaseRequest -> DownloadLease | 204
``POST /download/{batch}/heartbeat``  worker   Heartbeat -> HeartbeatResponse | 409
``POST /download/{batch}/complete``   worker   DownloadReport -> BatchState | 409 | 422
``POST /download/{batch}/fail``       worker   FailReport -> BatchState | 409
``POST /postprocess/lease``           gpu      LeaseRequest -> PostprocessLease | 204
``POST /postprocess/{batch}/heartbeat`` gpu    Heartbeat -> HeartbeatResponse | 409
``POST /postprocess/{batch}/complete``  gpu    PostprocessReport -> BatchState | 409 | 422
``POST /postprocess/{batch}/fail``    gpu      FailReport -> BatchState | 409
``POST /robots/lookup``               worker   RobotsLookup -> RobotsLookupResult
``POST /robots``                      worker   RobotsStore -> RobotsStored
``GET  /stats``                       none     -> FarmStats (read-only aggregates)
``GET  /healthz`` (no prefix)         none     -> {"status": "ok"}
====================================  =======  ==========================================

Errors are JSON: ``{"error": "<class>", "detail": "<text>"}`` (``ErrorBody``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_serializer,
    field_validator,
    model_validator,
)

API_PREFIX = "/api/v1"

#: PostgreSQL's ``bigint`` and ``integer`` maxima: a number a request carries into one of
#: those columns (or compares with one) is refused above them, never passed on.
BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1


def _storable(value: str) -> str:
    """PostgreSQL text and jsonb hold no NUL character: refuse it at the door (a lone
    surrogate, the other string they cannot hold, is refused by pydantic's strict str)."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


# The request models' field types are strict: ``10.0``, ``true`` and ``"5"`` are not
# counts, ``1`` is not a flag, ``Infinity`` and ``NaN`` are not durations.
Text = Annotated[StrictStr, AfterValidator(_storable)]
Key = Annotated[Text, Field(max_length=100)]
Count = Annotated[StrictInt, Field(ge=0, le=BIGINT_MAX)]
SmallCount = Annotated[StrictInt, Field(ge=0, le=INT_MAX)]
Seconds = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Figures(BaseModel):
    """A response only read (dashboards, ``pairfarm status``, other versions of the
    client): fields it does not know are ignored, so a newer coordinator may add some."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Role(StrEnum):
    WORKER = "worker"  # download worker
    GPU = "gpu"  # post-processing node
    ADMIN = "admin"  # ingest, token management, everything


class BatchStatus(StrEnum):
    PENDING = "pending"  # formed (or returned after an expired lease), waiting for a worker
    LEASED = "leased"  # a download worker holds it
    DOWNLOADED = "downloaded"  # shard written, waiting for post-processing
    POSTPROCESSING = "postprocessing"  # a post-processing node holds it
    DONE = "done"
    FAILED = "failed"  # terminal: attempts exhausted or declared failed


class ErrorBody(_Model):
    error: str
    detail: str


class RegisterRequest(_Model):
    name: Text = Field(max_length=200, description="host name or label of the client")
    version: Text = Field(max_length=50)


class RegisterResponse(_Model):
    worker_id: int
    role: Role
    batch_size: int
    lease_ttl_s: float
    heartbeat_interval_s: float


class LeaseRequest(_Model):
    max_size: StrictInt | None = Field(
        default=None, ge=1, le=INT_MAX,
        description="take at most this many candidates (server caps it)")
    ahead: bool = Field(
        default=False,
        description="the caller still holds a batch (a lease-ahead): granted only while "
                    "more than this batch is left, so that the last one goes to a worker "
                    "with nothing in hand")


NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class Candidate(NamedTuple):
    """One candidate of a batch, as the worker holds it: a named tuple, because a batch
    makes 10k of them (4 ms here; 10k pydantic models took 72 ms, frozen dataclasses 21)."""

    id: int
    url: str
    caption: str
    language: str | None = None
    extra: Mapping[str, Any] = NO_EXTRA
    #: which attempt at this URL the batch is: 1, or more when an earlier batch's
    #: outcome was transient and the coordinator sent it back (``--url-retries``)
    attempt: int = 1


class CandidateColumns(_Model):
    """A batch's candidates on the wire: one array per field, element i of each array
    belongs to candidate i. Parsing 10k candidates this way took 15 ms here, where an
    array of 10k objects took 76 ms (``model_validate_json``) or 119 ms (``json.loads``
    then validate)."""

    id: list[int]
    url: list[str]
    caption: list[str]
    language: list[str | None]
    extra: list[dict[str, Any]]
    #: each candidate's attempt (``Candidate.attempt``); empty: all first attempts
    attempt: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _same_length(self) -> CandidateColumns:
        lengths = {len(self.id), len(self.url), len(self.caption), len(self.language),
                   len(self.extra)}
        if self.attempt:
            lengths.add(len(self.attempt))
        if len(lengths) != 1:
            raise ValueError(f"candidate columns differ in length: {sorted(lengths)}")
        return self

    def rows(self) -> list[Candidate]:
        attempts = self.attempt or [1] * len(self.id)
        return list(map(Candidate._make, zip(self.id, self.url, self.caption, self.language,
                                              self.extra, attempts, strict=True)))

    @classmethod
    def of(cls, rows: list[Candidate]) -> CandidateColumns:
        attempts = [c.attempt for c in rows]
        return cls(id=[c.id for c in rows], url=[c.url for c in rows],
                   caption=[c.caption for c in rows], language=[c.language for c in rows],
                   extra=[dict(c.extra) for c in rows],
                   attempt=attempts if any(a != 1 for a in attempts) else [])


class LeaseInfo(_Model):
    batch_id: int
    lease_token: str
    lease_expires_at: datetime
    attempt: int


class DownloadLease(LeaseInfo):
    """A batch to download. ``candidates[i]`` is written under key ``key_of(batch_id, i)``.

    On the wire ``candidates`` is a ``CandidateColumns`` object; in Python a list of
    ``Candidate``."""

    candidates: list[Candidate]
    #: transient outcomes (``pairfarm.outcomes.TRANSIENT``) of candidates whose attempt is
    #: at most this are tried again in a later batch (the report's ``retry``); 0: never
    url_retries: int = 0

    @field_validator("candidates", mode="plain", json_schema_input_type=CandidateColumns)
    @classmethod
    def _from_columns(cls, value: Any) -> list[Candidate]:
        if isinstance(value, list) and all(isinstance(c, Candidate) for c in value):
            return value
        return CandidateColumns.model_validate(value).rows()

    @field_serializer("candidates")
    def _to_columns(self, value: list[Candidate]) -> dict[str, Any]:
        return CandidateColumns.of(value).model_dump(exclude_defaults=True)


class ShardFiles(_Model):
    """Where a download shard's files are, as fsspec URLs or paths, with the tar's digest."""

    tar: Text = Field(min_length=1, max_length=2000)
    parquet: Text = Field(min_length=1, max_length=2000)
    stats: Text = Field(min_length=1, max_length=2000)
    tar_sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    parquet_sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    tar_bytes: Count


class PostprocessLease(LeaseInfo):
    shard: ShardFiles
    #: samples in the shard's tar (the batch's ``ok`` outcomes)
    count: int


class Heartbeat(_Model):
    lease_token: Text = Field(max_length=200)


class HeartbeatResponse(_Model):
    lease_expires_at: datetime


#: the most candidate ids a report's ``retry`` lists (the coordinator's largest batch)
MAX_RETRY_IDS = 1_000_000
CandidateId = Annotated[StrictInt, Field(ge=1, le=BIGINT_MAX)]


class DownloadReport(_Model):
    """A finished download batch. ``outcomes`` maps each outcome class
    (``pairfarm.outcomes.Outcome``) to its count; the counts sum to the batch size.

    ``retry`` maps a transient outcome class (``pairfarm.outcomes.TRANSIENT``) to the ids
    of the batch's candidates that ended in it and that the shard marks not final
    (attempt <= the lease's ``url_retries``): the coordinator sends them back for a
    later batch; they stay counted in ``outcomes`` too."""

    lease_token: Text = Field(max_length=200)
    shard: ShardFiles
    outcomes: dict[Key, Count] = Field(max_length=100)
    bytes_downloaded: Count
    duration_s: Seconds
    retry: dict[Key, Annotated[list[CandidateId], Field(max_length=MAX_RETRY_IDS)]] = Field(
        default_factory=dict, max_length=100)


class PostprocessReport(_Model):
    lease_token: Text = Field(max_length=200)
    kept: SmallCount
    dropped: SmallCount
    drop_reasons: dict[Key, Count] = Field(default_factory=dict, max_length=1000)
    #: similarity histogram: ``counts[i]`` samples in ``[edges[i], edges[i+1])``
    similarity_edges: list[Finite] = Field(default_factory=list, max_length=1001)
    similarity_counts: list[Count] = Field(default_factory=list, max_length=1000)
    outputs: dict[Key, Annotated[Text, Field(max_length=2000)]] = Field(
        default_factory=dict, max_length=100, description="name -> location")
    duration_s: Seconds


class FailCause(StrEnum):
    """Whose fault a failed batch is."""

    BATCH = "batch"  # the batch or its report: an attempt is spent
    WORKER = "worker"  # the client's own machine (disk, output, settings): none is spent


class FailReport(_Model):
    lease_token: Text = Field(max_length=200)
    reason: Text = Field(max_length=2000)
    #: True when the client gives the batch back unworked (shutdown): no attempt is charged.
    release: StrictBool = False
    #: ``worker``: the failure is the client's own (its disk, its output); the batch goes
    #: back to the queue and no attempt is charged
    cause: FailCause = FailCause.BATCH


class BatchState(_Model):
    batch_id: int
    status: BatchStatus
    attempts: int


class WorkerStatus(_Figures):
    """A client seen recently, for the dashboard."""

    id: int
    name: str
    role: Role
    version: str | None = None
    last_seen_at: datetime
    #: batches this client holds a lease on now
    batches: list[int] = Field(default_factory=list)
    #: seconds since the client was last seen (the database's clock)
    last_seen_s: float | None = None
    #: download workers: candidates of the batches it completed within the rate window,
    #: per second of that window (None for other roles)
    rate_per_s: float | None = None
    #: download workers: candidates of every batch it completed
    downloaded: int = 0
    #: set while the coordinator refuses this worker leases (its batches kept failing)
    quarantined_until: datetime | None = None
    quarantine_reason: str | None = None


class ThroughputPoint(_Figures):
    """One minute of the throughput chart: batches whose download completed in it."""

    start: datetime
    #: candidates of those batches (every outcome)
    candidates: int
    #: of which ``ok`` (an image in the shard)
    ok: int


class SimilarityHistogram(_Figures):
    """The post-processing reports' similarity histograms summed: ``counts[i]`` samples
    in ``[edges[i], edges[i+1])``; empty before the first report with one."""

    edges: list[float] = Field(default_factory=list)
    counts: list[int] = Field(default_factory=list)


class FarmStats(_Figures):
    """``GET /stats``: the farm's figures, all computed over the batches table."""

    candidates_total: int
    #: candidates not downloaded yet: unbatched, or in a pending or leased batch
    candidates_pending: int
    batches: dict[str, int]
    #: sum of the completed download reports, by outcome class: each URL once, by its
    #: final outcome (an attempt sent back for a retry is counted in ``retried`` instead)
    outcomes: dict[str, int]
    bytes_downloaded: int
    kept: int
    dropped: int
    workers_alive: int
    #: candidates no batch holds yet
    candidates_unbatched: int = 0
    #: candidates by the status of their batch (plus "unbatched")
    candidates_by_status: dict[str, int] = Field(default_factory=dict)
    #: clients seen within the alive window, with the batches they hold
    workers: list[WorkerStatus] = Field(default_factory=list)
    #: when the figures were read (the database's clock)
    generated_at: datetime | None = None
    #: share of the candidates no longer waiting for a download, in percent
    progress_pct: float = 0.0
    #: the window ``download_rate_per_s`` and the workers' rates are measured over
    rate_window_s: float = 600.0
    #: candidates downloaded per second over the rate window (or the farm's age if less)
    download_rate_per_s: float = 0.0
    #: seconds until every pending candidate is downloaded at that rate (None at rate 0)
    eta_s: float | None = None
    #: per-minute downloads of the last hour, oldest first, the current minute last
    throughput: list[ThroughputPoint] = Field(default_factory=list)
    #: batches post-processed (done) and those that got that far or are on the way
    #: (downloaded, postprocessing or done)
    postprocess_batches_done: int = 0
    postprocess_batches_total: int = 0
    #: kept / (kept + dropped); None before the first post-processed sample
    kept_ratio: float | None = None
    similarity: SimilarityHistogram = Field(default_factory=SimilarityHistogram)
    #: URL attempts sent back for a later batch after a transient outcome (a URL tried
    #: three times counts 2); ``outcomes`` counts each URL once, by its final outcome
    retried: int = 0
    #: candidates waiting for such a later attempt now (part of ``candidates_pending``)
    candidates_retry_waiting: int = 0


# -- robots.txt shared across the farm (``worker.robotstxt``, ``coordinator.robots``) ------

#: RFC 9309: a crawler parses at least the first 500 KiB of a robots.txt; we keep no more
ROBOTS_MAX_BYTES = 500 * 1024
#: the longest a shared robots.txt answer is kept (RFC 9309: at most 24 h, unless the
#: file cannot be fetched)
ROBOTS_MAX_TTL_S = 86_400
#: origins per lookup, answers per store
ROBOTS_MAX_ORIGINS = 1000
ROBOTS_MAX_ENTRIES = 200
#: ``scheme://host[:port]``, lower case, no path: robots.txt applies to one origin
Origin = Annotated[StrictStr, Field(max_length=300,
                                    pattern=r"^https?://[a-z0-9._~%!$&'()*+,;=:\[\]-]+$")]


class RobotsKind(StrEnum):
    """What a robots.txt fetch found (RFC 9309 section 2.3.1)."""

    RULES = "rules"  # 2xx: the body's rules apply
    ALLOW_ALL = "allow_all"  # 4xx or too many redirects: "unavailable", anything goes
    DISALLOW_ALL = "disallow_all"  # 5xx, 429, network error, timeout: "unreachable"


class RobotsLookup(_Model):
    origins: list[Origin] = Field(min_length=1, max_length=ROBOTS_MAX_ORIGINS)


class RobotsEntry(_Model):
    """One origin's robots.txt as a worker fetched it; ``body`` holds its rule lines only
    (user-agent, allow, disallow) and is empty unless ``kind`` is ``rules``."""

    origin: Origin
    kind: RobotsKind
    #: the HTTP status of the last answer (0: none, the host could not be reached)
    status: StrictInt = Field(ge=0, le=999)
    body: Text = Field(default="", max_length=ROBOTS_MAX_BYTES)
    #: seconds the answer stays valid from when the coordinator stores it
    ttl_s: StrictInt = Field(ge=1, le=ROBOTS_MAX_TTL_S)


class RobotsStore(_Model):
    entries: list[RobotsEntry] = Field(min_length=1, max_length=ROBOTS_MAX_ENTRIES)


class RobotsStored(_Model):
    stored: int


class RobotsCached(_Model):
    """A stored answer still valid: ``expires_in_s`` by the coordinator's clock."""

    origin: str
    kind: RobotsKind
    status: int
    body: str
    expires_in_s: float


class RobotsLookupResult(_Model):
    """The origins' valid answers; an origin with none is absent (the worker fetches it).
    ``more`` lists the origins left out to keep the response small: ask again."""

    entries: list[RobotsCached]
    more: list[str] = Field(default_factory=list)
