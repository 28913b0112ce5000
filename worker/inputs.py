"""URL lists for ``pairfarm download``: img2dataset's input formats, read into shards.

Inputs (``input_files``): files, folders (every file of a known format in it, or of
``--input-format``; hidden files skipped) and glob patterns, local or fsspec URLs, in
sorted order. Formats: ``txt`` (one URL per line), ``csv``, ``tsv``, ``json`` (an array
of objects, or an object of columns), ``jsonl``, ``parquet``, each optionally
gzip-compressed with ``.gz``; guessed per file from its name unless given. The URL and
caption columns are named by the caller (img2dataset's ``url_col`` / ``caption_col``),
every other column is kept as an extra column of the output parquet.

Shards (``shards_of_files``): as img2dataset, each file is cut into shards of
``shard_size`` rows, numbered from 0 across the files in order, so the same inputs give
the same shards on every run (what ``--incremental-mode incremental`` relies on).
Candidate ids are the rows' positions over all the files.

Error handling: unreadable files, unknown formats, missing columns and bad box cells
raise ``SettingsError`` with the file name (and row).
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pairfarm.protocol import Candidate
from worker.blur import parse_boxes
from worker.errors import SettingsError
from worker.settings import INPUT_FORMATS

FORMATS = (*INPUT_FORMATS, *(f"{name}.gz" for name in INPUT_FORMATS))
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Columns:
    """Which input columns mean what (img2dataset's names)."""

    url: str = "url"
    caption: str | None = "caption"
    #: the ``--verify-hash`` column, required when set
    verify_hash: str | None = None
    #: the ``--bbox-col`` column, required and checked cell by cell when set
    bbox: str | None = None


@dataclass(frozen=True)
class InputFile:
    path: str
    input_format: str


@dataclass(frozen=True)
class Shard:
    number: int
    candidates: list[Candidate]


def guess_format(path: str) -> str:
    """``csv``, ``csv.gz``, ...: the format a file's name says."""
    name = PurePosixPath(path).name.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(f".{fmt}"):
            return fmt
    raise SettingsError(f"{path}: cannot tell the format, pass --input-format {FORMATS}")


def input_files(sources: list[str], input_format: str | None) -> list[InputFile]:
    """Every file the sources name, sorted within each source, with its format."""
    found: list[InputFile] = []
    for source in sources:
        paths = _expand(source, input_format)
        if not paths:
            raise SettingsError(f"{source}: no input file found")
        found.extend(InputFile(p, input_format or guess_format(p)) for p in paths)
    return found


def _expand(source: str, input_format: str | None) -> list[str]:
    try:
        fs, path = fsspec.core.url_to_fs(source)
        if _GLOB_CHARS & set(source):
            return [_url(fs, p) for p in sorted(fs.glob(path))
                    if fs.isfile(p) and not _hidden(p)]
        if fs.isdir(path):
            return [_url(fs, p) for p in sorted(fs.ls(path, detail=False))
                    if fs.isfile(p) and _wanted(p, input_format)]
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{source}: {exc}") from exc
    return [source]


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return str(fs.unstrip_protocol(path))


def _hidden(path: str) -> bool:
    """A hidden file, or one of img2dataset's and ours (``_stats.json``, ``_tmp``)."""
    return PurePosixPath(path).name.startswith((".", "_"))


def _wanted(path: str, input_format: str | None) -> bool:
    name = PurePosixPath(path).name.lower()
    if _hidden(path):
        return False
    if input_format is not None:
        return name.endswith(f".{input_format}")
    return any(name.endswith(f".{fmt}") for fmt in FORMATS)


def read_table(path: str, input_format: str) -> pa.Table:
    try:
        with fsspec.open(path, "rb") as src:
            raw = src.read()
        if input_format.endswith(".gz"):
            raw = gzip.decompress(raw)
        return _read(raw, input_format.removesuffix(".gz"))
    except (OSError, EOFError, ValueError, pa.ArrowException) as exc:
        raise SettingsError(f"{path}: cannot read it as {input_format}: {exc}") from exc


def _read(raw: bytes, base_format: str) -> pa.Table:
    if base_format == "parquet":
        return pq.read_table(io.BytesIO(raw))
    if base_format == "txt":
        urls = [line.strip() for line in raw.decode().splitlines() if line.strip()]
        return pa.table({"url": pa.array(urls, type=pa.string())})
    if base_format == "jsonl":
        return pajson.read_json(io.BytesIO(raw))
    if base_format == "json":
        return _json_table(json.loads(raw))
    delimiter = "\t" if base_format == "tsv" else ","
    return pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(delimiter=delimiter))


def _json_table(data: Any) -> pa.Table:
    """pandas' ``read_json`` forms img2dataset accepts: records, or columns."""
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return pa.Table.from_pylist(data)
    if isinstance(data, dict) and all(isinstance(v, list | dict) for v in data.values()):
        return pa.table({k: list(v.values()) if isinstance(v, dict) else v
                         for k, v in data.items()})
    raise ValueError("a json input is an array of objects or an object of columns")


def candidates(table: pa.Table, columns: Columns, *, first_id: int = 0,
               name: str = "input") -> list[Candidate]:
    """One candidate per row, ids from ``first_id``, other columns as extras."""
    wanted = [columns.url, columns.caption, columns.verify_hash, columns.bbox]
    for column in filter(None, wanted):
        if column not in table.column_names:
            raise SettingsError(f"{name}: no column {column!r}; columns: {table.column_names}")
    rows = table.to_pylist()
    if columns.bbox is not None:
        _check_boxes(rows, columns.bbox, name)
    return [_candidate(first_id + i, row, columns) for i, row in enumerate(rows)]


def _check_boxes(rows: list[dict[str, Any]], column: str, name: str) -> None:
    for number, row in enumerate(rows, start=1):
        try:
            parse_boxes(row[column])
        except ValueError as exc:
            raise SettingsError(f"{name}: row {number}, column {column!r}: {exc}") from exc


def _candidate(i: int, row: dict[str, Any], columns: Columns) -> Candidate:
    caption = "" if columns.caption is None else str(row.pop(columns.caption) or "")
    url = str(row.pop(columns.url) or "")
    return Candidate(id=i, url=url, caption=caption, extra=row)


def shards_of(items: list[Candidate], size: int, first: int = 0
              ) -> Iterator[tuple[int, list[Candidate]]]:
    for number, start in enumerate(range(0, len(items), size), start=first):
        yield number, items[start:start + size]


def shards_of_files(files: list[InputFile], columns: Columns, size: int) -> Iterator[Shard]:
    """Each file's rows in shards of ``size``, numbered from 0 across the files."""
    next_number = first_id = 0
    for source in files:
        table = read_table(source.path, source.input_format)
        items = candidates(table, _columns_for(source, columns), first_id=first_id,
                           name=source.path)
        for number, chunk in shards_of(items, size, first=next_number):
            yield Shard(number, chunk)
        next_number += math.ceil(len(items) / size)
        first_id += len(items)


def _columns_for(source: InputFile, columns: Columns) -> Columns:
    """A txt file has one column, ``url``, and no caption."""
    if source.input_format.removesuffix(".gz") != "txt":
        return columns
    return Columns(url="url", caption=None, verify_hash=columns.verify_hash, bbox=columns.bbox)
