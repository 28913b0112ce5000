"""``pairfarm ingest FILES...``."""

from __future__ import annotations

from pathlib import Path

import click

from coordinator.cli import database_options, friendly_errors, settings_from
from coordinator.ingest.reader import FORMATS
from coordinator.ingest.waves import WAVE_SIZE


@click.command("ingest")
@database_options
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input-format", type=click.Choice(FORMATS), default=None,
              envvar="PAIRFARM_INPUT_FORMAT",
              help="Format of every file; default: from each file name "
                   "(.parquet, .csv, .tsv, .jsonl, optionally .gz).")
@click.option("--url-col", default="url", show_default=True, envvar="PAIRFARM_URL_COL",
              help="Column holding the image URL.")
@click.option("--caption-col", default="caption", show_default=True,
              envvar="PAIRFARM_CAPTION_COL", help="Column holding the alt-text.")
@click.option("--language-col", default=None, envvar="PAIRFARM_LANGUAGE_COL",
              help="Column holding a language tag, if any.")
@click.option("--extra-col", "extra_cols", multiple=True,
              help="Keep only these extra columns (repeatable); default: keep all others.")
@click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every rejected row (file, row, reason, url) to this CSV file.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              envvar="PAIRFARM_INGEST_JOBS",
              help="Load this many files at once, each on its own connections (and its "
                   "own PostgreSQL backend); each file is still one transaction.")
@click.option("--wave-size", type=click.IntRange(1, None), default=WAVE_SIZE,
              show_default=True, envvar="PAIRFARM_INGEST_WAVE_SIZE",
              help="Freeze the dedup's current wave of URL hashes once it holds this many "
                   "(checked after each file); new hashes go into a fresh, small index.")
@friendly_errors
def ingest(*, database_url: str | None, data_dir: Path, files: tuple[Path, ...],
           input_format: str | None, url_col: str, caption_col: str,
           language_col: str | None, extra_cols: tuple[str, ...],
           rejects: Path | None, jobs: int, wave_size: int) -> None:
    """Load candidate (URL, caption) pairs from FILES into the coordinator.

    Rows are validated (http/https only; URLs cleaned as a browser requests them, spaces
    and non-ASCII percent-encoded, at most 8,192 characters; captions of 5..4096
    characters, control characters stripped); exact duplicate URLs are skipped, the
    first one ingested wins. Each file loads in one transaction: a malformed file loads
    nothing. Re-running a file inserts nothing new.
    """
    from rich.console import Console

    from coordinator.cli import engine_for
    from coordinator.ingest.run import ingest as run_ingest
    from coordinator.ingest.run import make_progress, print_summary
    from coordinator.ingest.validate import Columns

    columns = Columns(url=url_col, caption=caption_col, language=language_col,
                      extra=extra_cols or None)
    settings = settings_from(database_url=database_url, data_dir=data_dir)
    with engine_for(settings) as engine, make_progress() as progress:
        url = engine.url.render_as_string(hide_password=False)
        summaries = run_ingest(url, files, columns, fmt=input_format, rejects=rejects,
                               progress=progress, jobs=jobs, wave_size=wave_size)
    print_summary(Console(), summaries)
