"""``pairfarm export LAYOUT SOURCE DEST``: the command line of ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from export.layouts import LAYOUTS
from pairfarm.shardformat import MAX_SHARD_ROWS


@click.command("export")
@click.argument("layout", type=click.Choice(sorted(LAYOUTS)), metavar="LAYOUT")
@click.argument("source")
@click.argument("dest")
@click.option("--samples-per-shard", type=click.IntRange(1, MAX_SHARD_ROWS), default=None,
              envvar="PAIRFARM_EXPORT_SAMPLES_PER_SHARD",
              help="Reshard: this many samples per output shard (default: one output "
                   "shard per farm batch).")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              envvar="PAIRFARM_EXPORT_EMBEDDINGS",
              help="Write the embeddings when the layout takes them and the source has "
                   "them.")
@click.option("--layout-option", "-O", "layout_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the layout itself (repeatable; for layouts that take "
                   "options, see docs/export.md).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar.")
def export_command(layout: str, source: str, dest: str, **opts: Any) -> None:
    """Export a farm's finished shards to DEST in LAYOUT, shards numbered from 0.

    LAYOUT: webdataset (img2dataset's), tfds-laion400m (TFDS's laion400m manual_dir,
    embeddings beside it), clip-retrieval (img_emb/ text_emb/ metadata/).

    SOURCE is a farm's --out folder (its postprocessed/ folder, else its shards/), or a
    folder of post-processed or download shards; any set of batch ids; a local path or an
    fsspec URL (s3://bucket/farm/shards). DEST is a local folder. Run it again after
    more batches finish: it adds them and rewrites nothing already exported (a short last
    shard of a --samples-per-shard export excepted). Keys are unique across the export.
    """
    from export.errors import ExportError
    from export.run import ExportSettings, export
    from export.settings import is_url

    if is_url(dest):
        raise click.BadParameter(f"{dest}: DEST is a local folder (export here, then copy "
                                 "it)", param_hint="DEST")
    try:
        settings = ExportSettings(layout=layout, source_url=source, dest=Path(dest),
                                  samples_per_shard=opts["samples_per_shard"],
                                  embeddings=opts["embeddings"],
                                  options=_options(opts["layout_options"]))
        with _Bar(opts["progress"]) as bar:
            result = export(settings, advance=bar.advance, on_total=bar.start)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"exported {result.samples} samples of {result.batches} new batches to {dest} "
               f"({layout}): {result.shards} shards, {result.total} samples in all")


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--layout-option")
        options[key] = value
    return options


class _Bar:
    """A rich progress bar over the samples to export (nothing with --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import Progress

        self._progress = Progress(disable=not enabled, transient=False)
        self._task = self._progress.add_task("exporting", total=None)

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, total: int) -> None:
        self._progress.update(self._task, total=total)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)
