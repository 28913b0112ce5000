"""The coordinator's commands: ``coordinator``, ``db upgrade``, ``token create|list|revoke``,
``batches list|requeue``.

Each reads its settings from flags or the environment and turns the coordinator's errors
into ``click.ClickException`` (a one-line message, exit status 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from coordinator.errors import CoordinatorError
from coordinator.locations import DEFAULT_SHARD_PREFIXES
from coordinator.settings import (
    DEFAULT_DATA_DIR,
    CoordinatorSettings,
    make_lease_settings,
    make_settings,
)

F = TypeVar("F", bound=Callable[..., Any])


def database_options(func: F) -> F:
    func = click.option(
        "--data-dir", type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_DATA_DIR, envvar="PAIRFARM_DATA_DIR", show_default=True,
        help="Embedded PostgreSQL data directory, used when no database URL is given.")(func)
    return click.option(
        "--database-url", envvar="DATABASE_URL", default=None, metavar="URL",
        help="PostgreSQL URL (postgresql://user:pass@host/db). Default: an embedded "
             "PostgreSQL in --data-dir. [env: DATABASE_URL]")(func)


def friendly_errors(func: F) -> F:
    """Turn the coordinator's errors into click's one-line error messages."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CoordinatorError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def settings_from(**options: Any) -> CoordinatorSettings:
    return make_settings(database_url=options.get("database_url"),
                         data_dir=options.get("data_dir", DEFAULT_DATA_DIR))


@contextmanager
def engine_for(settings: CoordinatorSettings, *, migrate: bool = False) -> Iterator[Any]:
    from coordinator.db import make_engine, open_database
    from coordinator.server import check_schema

    with open_database(settings, migrate=migrate) as url:
        check_schema(url)
        engine = make_engine(url, pool_size=2)
        try:
            yield engine
        finally:
            engine.dispose()


def archive_options(prefix: str) -> Callable[[F], F]:
    """``--{prefix}file-candidates``, ``--{prefix}min-age`` and ``--{prefix}downloaded``:
    shared by ``pairfarm archive`` and the coordinator's automatic mode, with the same
    environment variables."""

    def add(func: F) -> F:
        func = click.option(
            f"--{prefix}downloaded", "downloaded", is_flag=True, default=False,
            envvar="PAIRFARM_ARCHIVE_DOWNLOADED", show_default=True,
            help="Archive downloaded batches too: their final state in a farm that runs no "
                 "post-processing (an archived batch is never post-processed).")(func)
        func = click.option(
            f"--{prefix}min-age", "min_age", default=600.0, type=click.FloatRange(0),
            envvar="PAIRFARM_ARCHIVE_MIN_AGE", show_default=True,
            help="Archive a finished batch once unchanged this many seconds (the stats' "
                 "download rate looks back 600 s).")(func)
        return click.option(
            f"--{prefix}file-candidates", "file_candidates", default=1_000_000,
            type=click.IntRange(1), envvar="PAIRFARM_ARCHIVE_FILE_CANDIDATES",
            show_default=True,
            help="Candidates per parquet file, at most (batches are never split).")(func)

    return add


def auto_archive_options(func: F) -> F:
    """The coordinator's automatic archive: ``--archive-to``, ``--hot-max-candidates``,
    ``--archive-interval`` and the shared ``--archive-*`` options."""
    func = archive_options("archive-")(func)
    func = click.option(
        "--archive-interval", "archive_interval", default=60.0, type=click.FloatRange(0.01),
        envvar="PAIRFARM_ARCHIVE_INTERVAL", show_default=True,
        help="Seconds between two looks of the automatic archive at the hot set.")(func)
    func = click.option(
        "--hot-max-candidates", "hot_max_candidates", default=0, type=click.IntRange(0),
        envvar="PAIRFARM_HOT_MAX_CANDIDATES", show_default=True,
        help="Archive finished batches in the background (into --archive-to) whenever "
             "the hot tables hold more candidates than this (0: never).")(func)
    return click.option(
        "--archive-to", "archive_to", default=None, envvar="PAIRFARM_ARCHIVE_TO",
        metavar="FOLDER_OR_URL",
        help="Folder of the automatic archive's parquet files (local path or fsspec "
             "URL); needed with --hot-max-candidates.")(func)


def auto_archive_settings(*, archive_to: str | None, hot_max_candidates: int,
                          archive_interval: float, file_candidates: int,
                          min_age: float, downloaded: bool) -> Any:
    """The automatic archive's settings; None when it is off."""
    from coordinator.errors import SettingsError
    from coordinator.settings import make_archive_settings

    if hot_max_candidates == 0:
        return None
    if not archive_to:
        raise SettingsError("--hot-max-candidates needs --archive-to (PAIRFARM_ARCHIVE_TO)")
    return make_archive_settings(location=archive_to, file_candidates=file_candidates,
                                 min_age_s=min_age, hot_max_candidates=hot_max_candidates,
                                 interval_s=archive_interval, downloaded=downloaded)


# -- pairfarm coordinator -----------------------------------------------------------------

@click.command("coordinator")
@database_options
@click.option("--host", default="127.0.0.1", envvar="PAIRFARM_HOST", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8600, type=int, envvar="PAIRFARM_PORT", show_default=True,
              help="TCP port to listen on.")
@click.option("--batch-size", default=10_000, type=int, envvar="PAIRFARM_BATCH_SIZE",
              show_default=True, help="Candidates per download batch.")
@click.option("--lease-ttl", default=600.0, type=float, envvar="PAIRFARM_LEASE_TTL",
              show_default=True, help="Seconds a lease lasts without a heartbeat.")
@click.option("--max-attempts", default=3, type=int, envvar="PAIRFARM_MAX_ATTEMPTS",
              show_default=True, help="Leases of a batch before it fails for good.")
@click.option("--max-sample-rows", default=500_000, type=int,
              envvar="PAIRFARM_MAX_SAMPLE_ROWS", show_default=True,
              help="Most rows a TABLESAMPLE may read; when a batch needs more (few rows "
                   "left unbatched), leases read the partial index instead.")
@click.option("--quarantine-after", default=5, type=int, envvar="PAIRFARM_QUARANTINE_AFTER",
              show_default=True,
              help="Refuse leases (429) to a worker whose last N batches failed, with no "
                   "completion in between, within --quarantine-window (0: never).")
@click.option("--quarantine-window", default=600.0, type=float,
              envvar="PAIRFARM_QUARANTINE_WINDOW", show_default=True,
              help="Seconds within which those failures must fall.")
@click.option("--quarantine-for", default=900.0, type=float, envvar="PAIRFARM_QUARANTINE_FOR",
              show_default=True, help="Seconds a quarantined worker gets no lease.")
@click.option("--url-retries", default=2, type=int, envvar="PAIRFARM_URL_RETRIES",
              show_default=True,
              help="Times a URL whose outcome was transient (timeout, connect, http_5xx, "
                   "http_429, host_busy) is tried again in a later batch (0: never).")
@click.option("--url-retry-delay", default=3600.0, type=float,
              envvar="PAIRFARM_URL_RETRY_DELAY", show_default=True,
              help="Seconds before a URL's first retry is due.")
@click.option("--url-retry-growth", default=4.0, type=float,
              envvar="PAIRFARM_URL_RETRY_GROWTH", show_default=True,
              help="Each further retry of a URL waits this many times longer.")
@click.option("--empty-hold", default=1.0, type=float, envvar="PAIRFARM_EMPTY_HOLD",
              show_default=True,
              help="Seconds after a lease found nothing during which this process answers "
                   "leases 204 without asking the database (unless it released, reaped or "
                   "re-queued something meanwhile), and after a lease found no new "
                   "candidate during which its leases take due URL retries only; 0: every "
                   "lease asks.")
@click.option("--revocation-check", default=1.0, type=float,
              envvar="PAIRFARM_REVOCATION_CHECK", show_default=True,
              help="Each process keeps the tokens it has seen and checks for revoked ones "
                   "at most this often, in seconds (a revoked token is refused within "
                   "it); 0: look the token up on every request.")
@click.option("--threads", default=8, type=click.IntRange(1, 64), envvar="PAIRFARM_THREADS",
              show_default=True,
              help="Threads of each process for the requests' database work; more wait "
                   "their turn without a thread.")
@click.option("--lease-concurrency", default=2, type=click.IntRange(1, 16),
              envvar="PAIRFARM_LEASE_CONCURRENCY", show_default=True,
              help="Download leases in flight at once in each process, on threads of "
                   "their own; the others wait in turn while heartbeats and completions "
                   "go on.")
@click.option("--keep-alive", default=75, type=click.IntRange(1, 3600),
              envvar="PAIRFARM_KEEP_ALIVE", show_default=True,
              help="Seconds an idle client connection stays open (pairfarm's clients let "
                   "theirs go after 60 s, before the server closes them).")
@click.option("--reap-interval", default=10.0, type=float, envvar="PAIRFARM_REAP_INTERVAL",
              show_default=True, help="Seconds between two passes of the lease reaper.")
@click.option("--max-body-bytes", default=1 << 20, type=int, envvar="PAIRFARM_MAX_BODY_BYTES",
              show_default=True, help="Largest request body accepted (413 above).")
@click.option("--shard-prefix", "shard_prefixes", multiple=True,
              default=DEFAULT_SHARD_PREFIXES, envvar="PAIRFARM_SHARD_PREFIXES",
              show_default=True,
              help="A reported shard's files must start with one of these (repeatable; "
                   "a plain path counts as file://PATH), e.g. s3://my-bucket/shards/.")
@click.option("--processes", default=1, type=click.IntRange(1, 64),
              envvar="PAIRFARM_PROCESSES", show_default=True,
              help="Server processes sharing the port (each with its own connection pool "
                   "of up to 30; PostgreSQL's max_connections must allow them all).")
@auto_archive_options
@click.option("--migrate/--no-migrate", default=False, envvar="PAIRFARM_MIGRATE",
              help="Upgrade a DATABASE_URL database before serving (the embedded one "
                   "always is).")
@click.pass_context
@friendly_errors
def coordinator(ctx: click.Context, *, database_url: str | None, data_dir: Path, host: str,
                port: int, batch_size: int, lease_ttl: float, max_attempts: int,
                max_sample_rows: int, quarantine_after: int, quarantine_window: float,
                quarantine_for: float, url_retries: int, url_retry_delay: float,
                url_retry_growth: float, empty_hold: float, revocation_check: float,
                threads: int, lease_concurrency: int, keep_alive: int,
                reap_interval: float,
                max_body_bytes: int,
                shard_prefixes: tuple[str, ...], processes: int, migrate: bool,
                **archive: Any) -> None:
    """Serve the coordinator's REST API (OpenAPI at /docs).

    Without DATABASE_URL it starts an embedded PostgreSQL in --data-dir, migrates it, and
    stops it on exit. Expired leases are reaped every --reap-interval seconds. With
    --processes N, N server processes share the port (the database is started and
    migrated once) and /metrics sums their counters.
    """
    from coordinator.server import serve

    lease = make_lease_settings(batch_size=batch_size, lease_ttl_s=lease_ttl,
                                max_attempts=max_attempts, max_sample_rows=max_sample_rows,
                                quarantine_after=quarantine_after,
                                quarantine_window_s=quarantine_window,
                                quarantine_s=quarantine_for, url_retries=url_retries,
                                url_retry_delay_s=url_retry_delay,
                                url_retry_growth=url_retry_growth, empty_hold_s=empty_hold)
    settings = make_settings(database_url=database_url, data_dir=data_dir, host=host,
                             port=port, lease=lease, reap_interval_s=reap_interval,
                             max_body_bytes=max_body_bytes, shard_prefixes=shard_prefixes,
                             archive=auto_archive_settings(**archive),
                             revocation_check_s=revocation_check, threads=threads,
                             lease_concurrency=lease_concurrency, keep_alive_s=keep_alive)
    verbose = ctx.find_root().params.get("verbose", 0)
    where = 'DATABASE_URL' if database_url else f'embedded PostgreSQL in {data_dir}'
    click.echo(f"pairfarm coordinator on http://{host}:{port} ({where}"
               f"{f', {processes} processes' if processes > 1 else ''})", err=True)
    serve(settings, migrate=migrate, log_level="debug" if verbose > 1 else "info",
          processes=processes)


# -- pairfarm db ------------------------------------------------------------------------

@click.group("db")
def db() -> None:
    """Database maintenance (schema migrations)."""


@db.command("upgrade")
@database_options
@click.option("--revision", default="head", show_default=True,
              help="Alembic revision to upgrade to.")
@friendly_errors
def db_upgrade(database_url: str | None, data_dir: Path, revision: str) -> None:
    """Apply the schema migrations to the database (DATABASE_URL or the embedded one)."""
    from coordinator.db import open_database
    from coordinator.migrate import current_revision, upgrade

    settings = settings_from(database_url=database_url, data_dir=data_dir)
    with open_database(settings, migrate=False) as url:
        before = current_revision(url)
        upgrade(url, revision)
        after = current_revision(url)
    click.echo(f"schema: {before or 'empty'} -> {after}")


# -- pairfarm token ---------------------------------------------------------------------

@click.group("token")
def token() -> None:
    """API tokens: one per worker, GPU node or admin; stored hashed, shown once."""


@token.command("create")
@database_options
@click.option("--role", type=click.Choice(["worker", "gpu", "admin"]), required=True,
              help="What the token may do: worker (download), gpu (post-process), admin.")
@click.option("--name", default=None,
              help="Label of the client (host name); default: <role>-<n>.")
@friendly_errors
def token_create(database_url: str | None, data_dir: Path, role: str,
                 name: str | None) -> None:
    """Create a token and print it on stdout (the only time it is shown)."""
    import secrets

    from coordinator.tokens import create_token

    label = name or f"{role}-{secrets.token_hex(3)}"
    with engine_for(settings_from(database_url=database_url, data_dir=data_dir)) as engine:
        token_id, value = create_token(engine, role, label)
    click.echo(f"created {role} token {token_id} ({label}); it is shown only now:", err=True)
    click.echo(value)


@token.command("list")
@database_options
@friendly_errors
def token_list(database_url: str | None, data_dir: Path) -> None:
    """List tokens (never their values): id, role, name, created, last seen, revoked."""
    from rich.console import Console
    from rich.table import Table

    from coordinator.tokens import list_tokens

    with engine_for(settings_from(database_url=database_url, data_dir=data_dir)) as engine:
        rows = list_tokens(engine)
    table = Table("id", "role", "name", "created", "last seen", "revoked")
    for r in rows:
        table.add_row(str(r.id), r.role, r.name, _ts(r.created_at), _ts(r.last_seen_at),
                      _ts(r.revoked_at))
    Console(width=120).print(table)


@token.command("revoke")
@database_options
@click.argument("ident")
@friendly_errors
def token_revoke(database_url: str | None, data_dir: Path, ident: str) -> None:
    """Revoke the token with id or name IDENT; its client gets 401 from then on."""
    from coordinator.tokens import revoke_token

    with engine_for(settings_from(database_url=database_url, data_dir=data_dir)) as engine:
        info = revoke_token(engine, ident)
    click.echo(f"revoked {info.role.value} token {info.id} ({info.name})")


def _ts(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


# -- pairfarm batches -------------------------------------------------------------------

@click.group("batches")
def batches() -> None:
    """Batches for an operator: list them, give failed ones back to the queue."""


def batch_filter_options(func: F) -> F:
    """``--state``, ``--reason``, ``--worker``, ``--id``: which batches (all must match)."""
    func = click.option("--id", "ids", type=click.IntRange(1), multiple=True,
                        help="Only this batch (repeatable).")(func)
    func = click.option("--worker", default=None, metavar="NAME_OR_ID",
                        help="Only batches this client held last (worker id, worker "
                             "name or token name).")(func)
    func = click.option("--reason", default=None, metavar="TEXT",
                        help="Only batches whose recorded failure reason contains TEXT "
                             "(case-insensitive).")(func)
    return click.option(
        "--state", "states", multiple=True, default=("failed",), show_default=True,
        type=click.Choice(["pending", "leased", "downloaded", "postprocessing", "done",
                           "failed"]),
        help="Only batches in this state (repeatable).")(func)


def _filter(states: tuple[str, ...], reason: str | None, worker: str | None,
            ids: tuple[int, ...]) -> Any:
    from coordinator.batches import BatchFilter
    from pairfarm.protocol import BatchStatus

    return BatchFilter(states=tuple(BatchStatus(s) for s in states), reason=reason,
                       worker=worker, ids=ids)


@batches.command("list")
@database_options
@batch_filter_options
@friendly_errors
def batches_list(*, database_url: str | None, data_dir: Path, states: tuple[str, ...],
                 reason: str | None, worker: str | None, ids: tuple[int, ...]) -> None:
    """List batches (failed ones by default): id, state, size, attempts, last client,
    updated, last error."""
    from rich.console import Console
    from rich.table import Table

    from coordinator.batches import list_batches

    with engine_for(settings_from(database_url=database_url, data_dir=data_dir)) as engine:
        rows = list_batches(engine, _filter(states, reason, worker, ids))
    table = Table("id", "state", "size", "attempts", "client", "updated", "last error")
    for r in rows:
        client = "-" if r.worker_id is None else f"{r.worker_id} ({r.worker_name})"
        table.add_row(str(r.id), r.status, str(r.size), f"{r.attempts}/{r.pp_attempts}",
                      client, _ts(r.updated_at), r.last_error or "-")
    Console(width=160).print(table)
    click.echo(f"{len(rows)} batches ({sum(r.size for r in rows)} candidates)")


@batches.command("requeue")
@database_options
@batch_filter_options
@click.option("--dry-run", is_flag=True, default=False,
              help="Say what would be requeued; change nothing.")
@friendly_errors
def batches_requeue(*, database_url: str | None, data_dir: Path, states: tuple[str, ...],
                    reason: str | None, worker: str | None, ids: tuple[int, ...],
                    dry_run: bool) -> None:
    """Give batches back to the queue (failed ones by default), attempts reset.

    A batch without a shard goes back to pending, one with a shard (failed in
    post-processing) to downloaded. Each keeps its candidates, so none is downloaded
    twice. A held batch (--state leased / postprocessing) is taken from its holder,
    whose lease is fenced out (409).
    """
    from coordinator.batches import requeue

    with engine_for(settings_from(database_url=database_url, data_dir=data_dir)) as engine:
        done = requeue(engine, _filter(states, reason, worker, ids), dry_run=dry_run)
    verb = "would requeue" if dry_run else "requeued"
    click.echo(f"{verb} {done.batches} batches ({done.candidates} candidates)")


# -- pairfarm archive -------------------------------------------------------------------

@click.command("archive")
@database_options
@click.option("--to", "location", required=True, envvar="PAIRFARM_ARCHIVE_TO",
              metavar="FOLDER_OR_URL",
              help="Folder for the parquet files: a local path or an fsspec URL "
                   "(s3://bucket/archive).")
@archive_options("")
@click.option("--until-hot", default=None, type=click.IntRange(0), metavar="N",
              help="Stop once the hot tables hold at most N candidates (default: archive "
                   "every finished batch).")
@friendly_errors
def archive_command(*, database_url: str | None, data_dir: Path, location: str,
                    file_candidates: int, min_age: float, downloaded: bool,
                    until_hot: int | None) -> None:
    """Move finished batches (done, failed; downloaded with --downloaded) out of the
    database into parquet files.

    Each file holds one row per candidate with its batch's final state and outcome
    counts; its batches, their members and candidates leave the hot tables in the
    transaction that records the file, and the stats keep counting them. Files in the
    folder that no run recorded (left by a run that was killed) are removed first.
    """
    from coordinator.archive import archive, describe
    from coordinator.db import open_database
    from coordinator.server import check_schema
    from coordinator.settings import make_archive_settings

    settings = make_archive_settings(location=location, file_candidates=file_candidates,
                                     min_age_s=min_age, downloaded=downloaded)
    with open_database(settings_from(database_url=database_url, data_dir=data_dir),
                       migrate=False) as url:
        check_schema(url)
        run = archive(url, settings, until_hot=until_hot, lock_wait_s=10.0)
    if run.skipped:
        raise click.ClickException(describe(run))
    click.echo(describe(run))
