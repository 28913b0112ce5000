"""``pairfarm extract``: Common Crawl WAT files -> candidate parquet shards."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import click

from extract.dedup import DEFAULT_CAPACITY, DEFAULT_FPR, KeyMode
from extract.language import DEFAULT_THRESHOLD
from extract.links import DEFAULT_MIN_ALT_CHARS
from extract.settings import BLOOM_FILE_NAME, DEFAULT_ROWS_PER_SHARD


@click.command("extract")
@click.argument("sources", nargs=-1, metavar="FILES_OR_URLS...")
@click.option("--out", "out_dir", required=True, envvar="PAIRFARM_EXTRACT_OUT", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the parquet shards, the summary json and the Bloom filter.")
@click.option("--from-list", "lists", multiple=True, type=click.Path(dir_okay=False,
              exists=True, path_type=Path),
              help="A file of WAT paths or URLs, one per line (.gz read too); repeatable.")
@click.option("--workers", type=int, default=None, envvar="PAIRFARM_EXTRACT_WORKERS",
              show_envvar=True, help="Worker processes.  [default: all cores]")
@click.option("--shard-rows", "rows_per_shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
              show_default=True, envvar="PAIRFARM_EXTRACT_SHARD_ROWS", show_envvar=True,
              help="Rows per output parquet shard.")
@click.option("--min-alt-chars", type=int, default=DEFAULT_MIN_ALT_CHARS, show_default=True,
              envvar="PAIRFARM_EXTRACT_MIN_ALT_CHARS", show_envvar=True,
              help="Drop alt texts shorter than this (after entity decoding and trimming).")
@click.option("--language-threshold", type=float, default=DEFAULT_THRESHOLD,
              show_default=True, envvar="PAIRFARM_EXTRACT_LANGUAGE_THRESHOLD",
              show_envvar=True,
              help="Label 'nolang' when the detector's probability is below this.")
@click.option("--dedup-key", type=click.Choice([m.value for m in KeyMode]),
              default=KeyMode.URL_ALT.value, show_default=True,
              envvar="PAIRFARM_EXTRACT_DEDUP_KEY", show_envvar=True,
              help="What makes two candidates duplicates.")
@click.option("--bloom", "bloom_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, envvar="PAIRFARM_EXTRACT_BLOOM", show_envvar=True,
              help="Persistent Bloom filter for dedup across runs."
                   f"  [default: OUT/{BLOOM_FILE_NAME}]")
@click.option("--no-bloom", is_flag=True, default=False,
              help="Dedup within this run only; read and write no Bloom filter.")
@click.option("--bloom-capacity", type=int, default=DEFAULT_CAPACITY, show_default=True,
              envvar="PAIRFARM_EXTRACT_BLOOM_CAPACITY", show_envvar=True,
              help="Items a new Bloom filter is sized for (an existing one keeps its own).")
@click.option("--bloom-fpr", type=float, default=DEFAULT_FPR, show_default=True,
              envvar="PAIRFARM_EXTRACT_BLOOM_FPR", show_envvar=True,
              help="False-positive rate of a new Bloom filter at capacity.")
@click.option("--ingest", is_flag=True, default=False, envvar="PAIRFARM_EXTRACT_INGEST",
              show_envvar=True,
              help="Run 'pairfarm ingest' on each shard as soon as it is complete.")
@click.option("--ingest-arg", "ingest_args", multiple=True,
              help="An extra argument for 'pairfarm ingest' (repeatable).")
@click.option("--http-timeout", type=float, default=60.0, show_default=True,
              envvar="PAIRFARM_EXTRACT_HTTP_TIMEOUT", show_envvar=True,
              help="Seconds without data before an http(s) source fails.")
@click.option("--http-retries", type=int, default=3, show_default=True,
              envvar="PAIRFARM_EXTRACT_HTTP_RETRIES", show_envvar=True,
              help="Retries of an http(s) source on connect errors, timeouts, 429 and 5xx.")
def extract_command(sources: tuple[str, ...], lists: tuple[Path, ...], **options: Any) -> None:
    """Extract (image URL, alt text) candidates from Common Crawl WAT files.

    Reads local WAT files or http(s) URLs of them, keeps every <img> with an alt text of at
    least --min-alt-chars characters and an http(s) source (resolved against the page URL
    and <base href>), labels the caption's language (en / another code / nolang), drops
    duplicates (within the run, and across runs with a Bloom filter) and writes parquet
    shards with the columns url, caption, page_url, language, language_score, source,
    which 'pairfarm ingest' reads. A corrupt record is counted and skipped; a file that
    cannot be read is reported in the summary and the run goes on; the exit status is 1
    when any file or ingest failed.
    """
    from extract.errors import ExtractError
    from extract.report import print_summary
    from extract.runner import run_extract
    from extract.settings import build_settings

    all_sources = [*sources, *(line for path in lists for line in _read_list(path))]
    try:
        settings = build_settings(sources=all_sources, use_bloom=not options.pop("no_bloom"),
                                  **options)
        result = run_extract(settings)
    except ExtractError as exc:
        raise click.ClickException(str(exc)) from exc
    print_summary(result, settings)
    if not result.ok:
        raise click.ClickException(
            f"{len(result.counts.failures)} file(s) and {len(result.ingest_failures)} ingest(s)"
            f" failed; see {result.summary_path}"
        )


def _read_list(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
