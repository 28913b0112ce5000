"""URL lists for ``pairfarm download``: img2dataset's input formats, read into candidates.

Formats: ``txt`` (one URL per line), ``csv``, ``tsv``, ``parquet``; the URL and caption
columns are named by the caller (img2dataset's ``url_col`` / ``caption_col``), every
other column is kept as an extra column of the output parquet.

Error handling: unreadable files, unknown formats and missing columns raise
``SettingsError`` with the file name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pairfarm.protocol import Candidate
from worker.errors import SettingsError

FORMATS = ("txt", "csv", "tsv", "parquet")


def guess_format(path: str) -> str:
    suffix = PurePath(path).suffix.lstrip(".").lower()
    if suffix not in FORMATS:
        raise SettingsError(f"{path}: cannot tell the format, pass --input-format {FORMATS}")
    return suffix


def read_table(path: str, input_format: str) -> pa.Table:
    try:
        with fsspec.open(path, "rb") as src:
            return _read(src, input_format)
    except (OSError, pa.ArrowException) as exc:
        raise SettingsError(f"{path}: cannot read it as {input_format}: {exc}") from exc


def _read(src: Any, input_format: str) -> pa.Table:
    if input_format == "parquet":
        return pq.read_table(src)
    if input_format == "txt":
        urls = [line.strip() for line in src.read().decode().splitlines() if line.strip()]
        return pa.table({"url": urls})
    delimiter = "\t" if input_format == "tsv" else ","
    return pacsv.read_csv(src, parse_options=pacsv.ParseOptions(delimiter=delimiter))


def candidates(table: pa.Table, url_col: str, caption_col: str | None) -> list[Candidate]:
    """One candidate per row, ids = row numbers, other columns as extras."""
    if url_col not in table.column_names:
        raise SettingsError(f"no column {url_col!r}; columns: {table.column_names}")
    if caption_col is not None and caption_col not in table.column_names:
        raise SettingsError(f"no column {caption_col!r}; columns: {table.column_names}")
    rows = table.to_pylist()
    return [_candidate(i, row, url_col, caption_col) for i, row in enumerate(rows)]


def _candidate(i: int, row: dict[str, Any], url_col: str, caption_col: str | None
               ) -> Candidate:
    caption = "" if caption_col is None else str(row.pop(caption_col) or "")
    url = str(row.pop(url_col) or "")
    return Candidate(id=i, url=url, caption=caption, extra=row)


def shards_of(items: list[Candidate], size: int) -> Iterator[tuple[int, list[Candidate]]]:
    for number, start in enumerate(range(0, len(items), size)):
        yield number, items[start:start + size]
