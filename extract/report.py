"""The end-of-run summary table (the same figures as the summary json)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from extract.runner import RunResult, failed_list_path
from extract.settings import ExtractSettings


def print_summary(result: RunResult, settings: ExtractSettings,
                  console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    console.print(_figures(result, settings))
    for failure in result.counts.failures:
        console.print(f"[red]failed[/red] {failure.source}: {failure.error}")
    for message in result.ingest_failures:
        console.print(f"[red]ingest failed[/red] {message}")
    if result.counts.failures:
        console.print(f"failed sources (rerun with --from-list): {failed_list_path(result)}")
    console.print(f"summary: {result.summary_path}")


def _figures(result: RunResult, settings: ExtractSettings) -> Table:
    counts = result.counts
    table = Table(title=f"pairfarm extract {result.run_id}", show_header=False)
    rows: list[tuple[str, str]] = [
        ("files", f"{counts.files:,} ({len(counts.failures)} failed)"),
        ("records", f"{counts.records:,} ({counts.corrupt_records:,} corrupt)"),
        ("pages", f"{counts.pages:,}"),
        ("images", f"{counts.images:,}"),
        ("kept", f"{counts.kept:,} in {len(result.shards)} shard(s)"),
    ]
    rows += [(f"dropped: {reason}", f"{n:,}") for reason, n in sorted(counts.dropped.items())]
    rows += [(f"language: {lang}", f"{n:,}") for lang, n in counts.languages.most_common(10)]
    rows.append(("time", f"{result.elapsed_s:.1f} s on {settings.workers} worker(s)"))
    if result.bloom is not None:
        rows.append(("bloom", _bloom_line(result.bloom)))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _bloom_line(bloom: dict[str, object]) -> str:
    return (f"{bloom['approx_items']:,} items / capacity {bloom['capacity']:,}, FPR now "
            f"{bloom['estimated_false_positive_rate']:.2e} (configured "
            f"{bloom['configured_false_positive_rate']:g}), {bloom['path']}")
