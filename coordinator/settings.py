"""The coordinator's settings: one frozen object, built and validated by ``make_settings``.

Every field can come from a command-line flag or from the environment (``DATABASE_URL``,
``PAIRFARM_BATCH_SIZE``, ``PAIRFARM_LEASE_TTL``, ...; see the click options in
``coordinator.cli``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.errors import SettingsError
from coordinator.locations import DEFAULT_SHARD_PREFIXES, parse_prefixes

DEFAULT_DATA_DIR = Path("farm-data/pg")
DEFAULT_DATABASE = "pairfarm"
DEFAULT_BATCH_SIZE = 10_000
#: the smallest batch ``auto_batch_size`` forms (a lease, a shard and a report per batch)
MIN_AUTO_BATCH_SIZE = 100
#: batches ``auto_batch_size`` aims to give each worker: enough for the last ones to spread
BATCHES_PER_WORKER = 4
#: the most retries of one URL (``--url-retries``), and the longest wait before one
MAX_URL_RETRIES = 20
MAX_URL_RETRY_WAIT_S = 365 * 86400.0


@dataclass(frozen=True, kw_only=True)
class LeaseSettings:
    """How batches are formed and how long a lease lasts."""

    batch_size: int = DEFAULT_BATCH_SIZE
    lease_ttl_s: float = 600.0
    max_attempts: int = 3
    #: sample at least this many times the chunks a batch needs (what concurrent leases
    #: hold and the sample's own variance take away), so that a sample is rarely short
    oversample: float = 1.25
    #: and enough pages that a batch takes at most this many chunks from each of them on
    #: average (the batch is taken at random from the sample): with chunks of ids alone
    #: (~43 a page) a 10k batch then takes ~11 chunks from each of ~58 pages (not 43 from
    #: each of ~15), ~4x the chunks it needs; with chunks that carry fragments (~3 a page)
    #: the oversample alone already spreads it over ~260 pages
    page_share: int = 11
    #: a sample reading more candidates' worth of pages than this costs more than the
    #: index fallback (with the defaults: once fewer than 8 % of the candidates are pending)
    max_sample_rows: int = 500_000
    #: a download worker that reports this many failures in a row (no completion in
    #: between) within ``quarantine_window_s`` gets no lease for ``quarantine_s``; 0: never
    quarantine_after: int = 5
    quarantine_window_s: float = 600.0
    quarantine_s: float = 900.0
    #: a URL whose outcome was transient (``pairfarm.outcomes.TRANSIENT``) is tried again
    #: in a later batch, up to this many times (0: never); the n-th retry is due
    #: ``url_retry_delay_s * url_retry_growth ** (n - 1)`` after the batch that sent it
    #: back completed
    url_retries: int = 2
    url_retry_delay_s: float = 3600.0
    url_retry_growth: float = 4.0
    #: after a lease found nothing to lease, this process answers "nothing" (204) without
    #: a transaction for this long, unless it released, reaped or re-queued something in
    #: between; 0: every lease looks
    empty_hold_s: float = 1.0

    @property
    def heartbeat_interval_s(self) -> float:
        return self.lease_ttl_s / 3


@dataclass(frozen=True, kw_only=True)
class ArchiveSettings:
    """Where finished batches are archived (``coordinator.archive``) and when."""

    #: a local folder or an fsspec URL (s3://bucket/archive)
    location: str
    #: candidates per parquet file, at most (a batch is never split; one bigger batch
    #: makes its file bigger)
    file_candidates: int = 1_000_000
    #: a finished batch is archived once unchanged this long (the stats' download rate
    #: looks back 600 s)
    min_age_s: float = 600.0
    #: the automatic mode archives when the hot tables hold more candidates (0: off)
    hot_max_candidates: int = 0
    #: seconds between two looks of the automatic mode
    interval_s: float = 60.0
    #: archive ``downloaded`` batches too (their final state when no post-processing runs;
    #: an archived batch is never post-processed)
    downloaded: bool = False

    @property
    def statuses(self) -> tuple[str, ...]:
        """The batch statuses archived: the final ones."""
        return ("done", "failed", "downloaded") if self.downloaded else ("done", "failed")


def make_archive_settings(*, location: str, file_candidates: int = 1_000_000,
                          min_age_s: float = 600.0, hot_max_candidates: int = 0,
                          interval_s: float = 60.0, downloaded: bool = False
                          ) -> ArchiveSettings:
    _check(bool(location.strip()), "the archive location must not be empty")
    _check(file_candidates >= 1, f"file candidates must be at least 1, not {file_candidates}")
    _check(min_age_s >= 0, f"the archive min age must not be negative, not {min_age_s}")
    _check(hot_max_candidates >= 0,
           f"hot max candidates must not be negative (0: off), not {hot_max_candidates}")
    _check(interval_s > 0, "the archive interval must be positive")
    return ArchiveSettings(location=location, file_candidates=file_candidates,
                           min_age_s=min_age_s, hot_max_candidates=hot_max_candidates,
                           interval_s=interval_s, downloaded=downloaded)


@dataclass(frozen=True, kw_only=True)
class CoordinatorSettings:
    database_url: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    port: int = 8600
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    reap_interval_s: float = 10.0
    max_body_bytes: int = 1 << 20
    #: a worker counts as alive when seen within this many seconds
    alive_window_s: float = 900.0
    #: the clients that called are marked seen (one write for all) at most once per this
    #: many seconds
    touch_interval_s: float = 5.0
    #: each process checks for revoked tokens at most once per this many seconds and
    #: keeps the tokens it has seen meanwhile (``coordinator.tokens.TokenCache``); 0: a
    #: lookup per request
    revocation_check_s: float = 1.0
    #: threads of each process for the requests' database work (the thread pool's size)
    threads: int = 8
    #: download leases in flight at once in each process, on threads of their own
    lease_concurrency: int = 2
    #: seconds an idle client connection is kept open (uvicorn's ``timeout_keep_alive``);
    #: longer than the clients' own (``pairfarm.client.KEEPALIVE_S``), so that a client
    #: lets a connection go before the server closes it under the client's request
    keep_alive_s: int = 75
    #: a reported shard's files must start with one of these (``coordinator.locations``)
    shard_prefixes: tuple[str, ...] = DEFAULT_SHARD_PREFIXES
    #: the automatic archive (``--hot-max-candidates``); None: off
    archive: ArchiveSettings | None = None


def auto_batch_size(waiting: int, workers: int, *, largest: int = DEFAULT_BATCH_SIZE,
                    smallest: int = MIN_AUTO_BATCH_SIZE,
                    per_worker: int = BATCHES_PER_WORKER) -> int:
    """A batch size for ``waiting`` candidates and ``workers`` workers: each worker gets
    about ``per_worker`` batches, within ``smallest``..``largest``.

    10,000 candidates and 2 workers make batches of 1,250 (8 batches, not one that a
    single worker takes while the other idles); a large input keeps ``largest``."""
    if workers < 1:
        raise SettingsError(f"workers must be at least 1, not {workers}")
    wanted = math.ceil(max(0, waiting) / (workers * per_worker))
    return min(largest, max(smallest, wanted))


def make_lease_settings(*, batch_size: int = 10_000, lease_ttl_s: float = 600.0,
                        max_attempts: int = 3, max_sample_rows: int = 500_000,
                        quarantine_after: int = 5, quarantine_window_s: float = 600.0,
                        quarantine_s: float = 900.0, url_retries: int = 2,
                        url_retry_delay_s: float = 3600.0,
                        url_retry_growth: float = 4.0,
                        empty_hold_s: float = 1.0) -> LeaseSettings:
    _check(1 <= batch_size <= 1_000_000, f"batch size must be in 1..1000000, not {batch_size}")
    _check(0 <= quarantine_after <= 1000,
           f"quarantine-after must be in 0..1000 (0: off), not {quarantine_after}")
    _check(quarantine_window_s > 0 and quarantine_s > 0,
           "the quarantine window and duration must be positive")
    _check(lease_ttl_s >= 1, f"lease TTL must be at least 1 s, not {lease_ttl_s}")
    _check(1 <= max_attempts <= 100, f"max attempts must be in 1..100, not {max_attempts}")
    _check(max_sample_rows >= batch_size,
           f"max sample rows must be at least the batch size, not {max_sample_rows}")
    _check_url_retries(url_retries, url_retry_delay_s, url_retry_growth)
    _check(math.isfinite(empty_hold_s) and 0 <= empty_hold_s <= 60,
           f"the empty hold must be in 0..60 s (0: off), not {empty_hold_s}")
    return LeaseSettings(batch_size=batch_size, lease_ttl_s=lease_ttl_s,
                         max_attempts=max_attempts, max_sample_rows=max_sample_rows,
                         quarantine_after=quarantine_after,
                         quarantine_window_s=quarantine_window_s, quarantine_s=quarantine_s,
                         url_retries=url_retries, url_retry_delay_s=url_retry_delay_s,
                         url_retry_growth=url_retry_growth, empty_hold_s=empty_hold_s)


def _check_url_retries(retries: int, delay_s: float, growth: float) -> None:
    _check(0 <= retries <= MAX_URL_RETRIES,
           f"url retries must be in 0..{MAX_URL_RETRIES} (0: never), not {retries}")
    _check(math.isfinite(delay_s) and delay_s >= 0,
           f"the url retry delay must be a number of seconds >= 0, not {delay_s}")
    _check(math.isfinite(growth) and growth >= 1,
           f"the url retry growth must be at least 1, not {growth}")
    longest = delay_s * growth ** max(0, retries - 1)
    _check(longest <= MAX_URL_RETRY_WAIT_S,
           f"the last url retry would wait {longest:.0f} s, more than a year: lower "
           "--url-retry-delay, --url-retry-growth or --url-retries")


def make_settings(*, database_url: str | None = None, data_dir: Path = DEFAULT_DATA_DIR,
                  host: str = "127.0.0.1", port: int = 8600,
                  lease: LeaseSettings | None = None, reap_interval_s: float = 10.0,
                  max_body_bytes: int = 1 << 20,
                  shard_prefixes: tuple[str, ...] = DEFAULT_SHARD_PREFIXES,
                  archive: ArchiveSettings | None = None,
                  revocation_check_s: float = 1.0, threads: int = 8,
                  lease_concurrency: int = 2, keep_alive_s: int = 75) -> CoordinatorSettings:
    """Validate and build the settings; ``SettingsError`` says what is wrong."""
    _check(0 <= port <= 65535, f"port must be in 0..65535, not {port}")
    _check(math.isfinite(revocation_check_s) and 0 <= revocation_check_s <= 300,
           f"the revocation check must be in 0..300 s (0: every request), "
           f"not {revocation_check_s}")
    _check(1 <= threads <= 64, f"threads must be in 1..64, not {threads}")
    _check(1 <= lease_concurrency <= 16,
           f"the lease concurrency must be in 1..16, not {lease_concurrency}")
    _check(1 <= keep_alive_s <= 3600,
           f"the keep-alive must be in 1..3600 s, not {keep_alive_s}")
    _check(reap_interval_s > 0, "the reap interval must be positive")
    _check(max_body_bytes >= 4096, "the body size cap must be at least 4096 bytes")
    return CoordinatorSettings(
        database_url=normalize_url(database_url) if database_url else None,
        data_dir=Path(data_dir), host=host, port=port, lease=lease or LeaseSettings(),
        reap_interval_s=reap_interval_s, max_body_bytes=max_body_bytes,
        shard_prefixes=parse_prefixes(shard_prefixes), archive=archive,
        revocation_check_s=revocation_check_s, threads=threads,
        lease_concurrency=lease_concurrency, keep_alive_s=keep_alive_s)


def normalize_url(url: str) -> str:
    """Accept ``postgres://`` / ``postgresql://`` URLs and select the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if not url.startswith("postgresql+psycopg://"):
        scheme = url.partition(":")[0]
        raise SettingsError(f"DATABASE_URL must be a postgresql:// URL, not {scheme}:")
    return url


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(message)
