"""``pairfarm status``: the farm's state from a coordinator's ``GET /api/v1/stats``.

Runs anywhere ``pairfarm.client`` does (a worker VM included): it needs only click, rich
and httpx, no token (the stats are public read-only aggregates) and no database.

Error handling: a coordinator that cannot be reached or answers with an error becomes a
one-line ``click.ClickException`` (exit status 1).
"""

from __future__ import annotations

import click
from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from pairfarm.protocol import BatchStatus, FarmStats, WorkerStatus

UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


@click.command("status")
@click.option("--coordinator", envvar="PAIRFARM_COORDINATOR", required=True, metavar="URL",
              help="Coordinator base URL, e.g. http://127.0.0.1:8600. "
                   "[env: PAIRFARM_COORDINATOR]")
@click.option("--json", "as_json", is_flag=True,
              help="Print the raw FarmStats JSON instead of tables.")
def status(coordinator: str, as_json: bool) -> None:
    """Show the farm's progress, ETA, batches, URL outcomes and workers."""
    stats = fetch_stats(coordinator)
    if as_json:
        click.echo(stats.model_dump_json(indent=2))
        return
    Console(width=max(100, Console().width)).print(render(stats, coordinator))


def fetch_stats(url: str) -> FarmStats:
    try:
        from pairfarm.client import ClientError, CoordinatorClient
    except ImportError as exc:  # the base install has no httpx
        raise click.ClickException(
            f"pairfarm status needs httpx: pip install 'pairfarm[worker]' ({exc})") from exc

    try:
        with CoordinatorClient(url) as client:
            return client.stats()
    except ClientError as exc:
        raise click.ClickException(f"cannot read the farm's stats from {url}: {exc}") from exc


def render(stats: FarmStats, url: str) -> Group:
    return Group(progress_table(stats, url), progress_bar(stats), batches_table(stats),
                 outcomes_table(stats), postprocess_table(stats), workers_table(stats))


def progress_bar(stats: FarmStats) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=100, completed=stats.progress_pct, width=60),
                 f"{stats.progress_pct:.1f} % downloaded")
    return grid


def progress_table(stats: FarmStats, url: str) -> Table:
    table = Table("candidates", "downloaded or failed", "pending", "done", "rate", "ETA",
                  "downloaded bytes", title=f"pairfarm at {url}", title_justify="left")
    done = stats.candidates_total - stats.candidates_pending
    eta = "done" if stats.candidates_pending == 0 else duration(stats.eta_s)
    table.add_row(f"{stats.candidates_total:,}", f"{done:,}", f"{stats.candidates_pending:,}",
                  f"{stats.progress_pct:.1f} %", rate(stats.download_rate_per_s), eta,
                  size(stats.bytes_downloaded))
    return table


def batches_table(stats: FarmStats) -> Table:
    table = Table("state", "batches", "candidates", title="batches", title_justify="left")
    table.add_row("unbatched", "-", f"{stats.candidates_unbatched:,}")
    for state in BatchStatus:
        table.add_row(state.value, f"{stats.batches.get(state.value, 0):,}",
                      f"{stats.candidates_by_status.get(state.value, 0):,}")
    return table


def outcomes_table(stats: FarmStats) -> Table:
    table = Table("outcome", "URLs", "share", title="URL outcomes", title_justify="left")
    total = sum(stats.outcomes.values())
    for outcome, count in sorted(stats.outcomes.items(), key=lambda kv: -kv[1]):
        table.add_row(outcome, f"{count:,}", f"{100 * count / total:.1f} %")
    if not stats.outcomes:
        table.add_row("(no completed batch yet)", "", "")
    return table


def postprocess_table(stats: FarmStats) -> Table:
    table = Table("batches done", "downloaded or later", "kept", "dropped", "kept ratio",
                  title="post-processing", title_justify="left")
    ratio = "-" if stats.kept_ratio is None else f"{100 * stats.kept_ratio:.1f} %"
    table.add_row(f"{stats.postprocess_batches_done:,}",
                  f"{stats.postprocess_batches_total:,}", f"{stats.kept:,}",
                  f"{stats.dropped:,}", ratio)
    return table


def workers_table(stats: FarmStats) -> Table:
    table = Table("name", "role", "last seen", "rate", "current batch", "downloaded",
                  title=f"workers ({stats.workers_alive} alive)", title_justify="left")
    for w in stats.workers:
        table.add_row(*worker_row(w))
    return table


def worker_row(w: WorkerStatus) -> list[str]:
    seen = "-" if w.last_seen_s is None else f"{duration(w.last_seen_s)} ago"
    batches = ", ".join(str(b) for b in w.batches) or "-"
    if w.quarantined_until is not None:
        batches = f"quarantined until {w.quarantined_until:%H:%M:%S}: {w.quarantine_reason}"
    downloaded = f"{w.downloaded:,}" if w.rate_per_s is not None else "-"
    return [w.name, w.role.value, seen, rate(w.rate_per_s), batches, downloaded]


def rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    return f"{per_s:.0f}/s" if per_s >= 10 else f"{per_s:.2f}/s"


def duration(seconds: float | None) -> str:
    """``1d 2h``, ``3h 04m``, ``5m 06s``, ``7s``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    days, hours, minutes, secs = s // 86400, s % 86400 // 3600, s % 3600 // 60, s % 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def size(n: int) -> str:
    value, unit = float(n), 0
    while value >= 1000 and unit < len(UNITS) - 1:
        value, unit = value / 1000, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {UNITS[unit]}"
