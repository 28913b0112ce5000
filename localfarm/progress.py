"""What ``pairfarm up`` shows while the farm runs: progress bars with rate and ETA."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pairfarm.protocol import BatchStatus, FarmStats

WAITING_FOR_DOWNLOAD = (BatchStatus.PENDING, BatchStatus.LEASED)
WAITING_FOR_POSTPROCESS = (BatchStatus.DOWNLOADED, BatchStatus.POSTPROCESSING)


def is_finished(stats: FarmStats, *, postprocess: bool) -> bool:
    """No candidate waits for a download (and, with post-processing, no shard for it)."""
    waiting = [*WAITING_FOR_DOWNLOAD, *(WAITING_FOR_POSTPROCESS if postprocess else ())]
    return stats.candidates_unbatched == 0 and all(
        stats.batches.get(s.value, 0) == 0 for s in waiting)


def downloaded(stats: FarmStats) -> int:
    return stats.candidates_total - stats.candidates_pending


def postprocessed(stats: FarmStats) -> int:
    by_status = stats.candidates_by_status
    return by_status.get(BatchStatus.DONE.value, 0) + by_status.get(BatchStatus.FAILED.value, 0)


class FarmProgress:
    """Two bars (download, post-processing) fed from the coordinator's stats."""

    def __init__(self, *, enabled: bool, postprocess: bool, dashboard: str,
                 console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.postprocess = postprocess
        self.dashboard = dashboard
        self._progress = Progress(
            TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not enabled, refresh_per_second=4,
        )
        self._download: TaskID | None = None
        self._post: TaskID | None = None

    def __enter__(self) -> FarmProgress:
        self.console.print(f"dashboard: [bold]{self.dashboard}[/bold]")
        self._progress.__enter__()
        self._download = self._progress.add_task("downloaded", total=None, detail="")
        if self.postprocess:
            self._post = self._progress.add_task("filtered", total=None, detail="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def update(self, stats: FarmStats) -> None:
        total = stats.candidates_total
        ok = stats.outcomes.get("ok", 0)
        assert self._download is not None
        self._progress.update(self._download, total=total, completed=downloaded(stats),
                              detail=f"ok {ok:,}  workers {stats.workers_alive}")
        if self._post is not None:
            self._progress.update(self._post, total=total, completed=postprocessed(stats),
                                  detail=f"kept {stats.kept:,} dropped {stats.dropped:,}")
