"""One WAT file -> an arrow table of candidates (runs inside a worker process).

Per page: every ``IMG`` link is an image; its alt text is cleaned and checked, its ``src``
resolved against the page's base URL; a candidate seen before in the same file is dropped
(``dup_in_run``) before its language is detected, and the detector runs once per distinct
caption of the file (alt texts repeat: "logo", product names). The run-wide dedup happens
in the runner, on ``FileResult.keys``.

Resource handling: the language model is loaded once per process (``init_process``) and
kept by ``labeller``'s cache for the process's life. The table holds one file's candidates.

Error handling: a corrupt record is counted (``corrupt_records``) and skipped. A file that
cannot be opened, is not a WARC file or ends inside a record yields a ``FileResult`` with
``error`` set and the candidates read before the fault: one bad file never stops a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from extract.counters import FileCounts
from extract.dedup import KeyMode, dedup_key
from extract.errors import CorruptRecord, SourceError
from extract.language import LanguageLabeller
from extract.links import Drop, check_alt, document_base, resolve_src
from extract.sources import HttpPolicy, open_source
from extract.wat import Page, iter_payloads, parse_page

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileSettings:
    """What a worker process needs to turn one file into candidates."""

    min_alt_chars: int
    language_threshold: float
    key_mode: KeyMode
    http: HttpPolicy


@dataclass(slots=True)
class FileResult:
    source: str
    counts: FileCounts
    table: pa.Table
    keys: list[int]  # the dedup key of each row of ``table``
    error: str | None = None


@dataclass(slots=True)
class _Columns:
    url: list[str] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    page_url: list[str] = field(default_factory=list)
    key: list[int] = field(default_factory=list)


def init_process(language_threshold: float) -> None:
    """Pool initializer: load the language model once in this process."""
    labeller(language_threshold)


@lru_cache(maxsize=1)
def labeller(threshold: float) -> LanguageLabeller:
    """This process's language labeller (loaded on first use, kept for the process)."""
    return LanguageLabeller(threshold)


def process_file(source: str, settings: FileSettings) -> FileResult:
    """Every candidate of one WAT file (a path or an http(s) URL), with its counts."""
    counts, columns = FileCounts(), _Columns()
    error = None
    try:
        _read_source(source, settings, counts, columns)
    except SourceError as exc:
        error = str(exc)
        log.info("%s: %s", source, exc)
    table = _to_table(columns, source, settings)
    return FileResult(source, counts, table, columns.key, error)


def _read_source(source: str, settings: FileSettings, counts: FileCounts,
                 columns: _Columns) -> None:
    seen: set[int] = set()
    with open_source(source, http=settings.http) as stream:
        for payload in iter_payloads(stream):
            counts.records += 1
            try:
                page = parse_page(payload)
            except CorruptRecord as exc:
                counts.corrupt_records += 1
                log.debug("%s: record %d skipped: %s", source, counts.records, exc)
                continue
            if page is not None:
                counts.pages += 1
                _collect(page, settings, counts, columns, seen)


def _collect(page: Page, settings: FileSettings, counts: FileCounts, columns: _Columns,
             seen: set[int]) -> None:
    base = document_base(page.url, page.base_href)
    counts.images += len(page.images)
    for image in page.images:
        caption = check_alt(image.alt, settings.min_alt_chars)
        if isinstance(caption, Drop):
            counts.dropped[caption] += 1
            continue
        url = resolve_src(image.src, base)
        if isinstance(url, Drop):
            counts.dropped[url] += 1
            continue
        key = dedup_key(url, caption, settings.key_mode)
        if key in seen:
            counts.dropped[Drop.DUP_IN_RUN] += 1
            continue
        seen.add(key)
        columns.url.append(url)
        columns.caption.append(caption)
        columns.page_url.append(page.url)
        columns.key.append(key)


def _to_table(columns: _Columns, source: str, settings: FileSettings) -> pa.Table:
    from extract.shards import candidate_table

    label = labeller(settings.language_threshold).label
    by_caption = {caption: label(caption) for caption in dict.fromkeys(columns.caption)}
    labels = [by_caption[caption] for caption in columns.caption]
    return candidate_table(
        url=columns.url,
        caption=columns.caption,
        page_url=columns.page_url,
        language=[label.language for label in labels],
        language_score=[label.score for label in labels],
        source=source,
    )
