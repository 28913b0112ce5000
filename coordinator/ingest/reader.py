"""Input files as Arrow record batches, whatever their format.

Formats follow img2dataset: ``parquet``, ``csv``, ``tsv``, ``jsonl`` (one JSON object a
line), each optionally gzipped (``.gz``; parquet compresses inside). The format comes
from the file name unless given.

Error handling: a file that cannot be parsed raises ``IngestError`` naming the file and,
where it can be found, the line: Arrow does not report line numbers, so after a failure
the file is scanned again with the standard library to find the first bad line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from coordinator.errors import IngestError

FORMATS = ("parquet", "csv", "tsv", "jsonl")
BLOCK_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 131_072


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str
    gzipped: bool

    @property
    def name(self) -> str:
        return str(self.path)


def detect(path: Path, fmt: str | None = None) -> InputFile:
    """The format of ``path``: ``fmt`` if given, else from its suffixes."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    guessed = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
               ".ndjson": "jsonl", ".json": "jsonl"}.get(suffixes[-1] if suffixes else "")
    chosen = fmt or guessed
    if chosen not in FORMATS:
        raise IngestError(f"{path}: cannot tell the format from the name; pass --input-format "
                          f"(one of {', '.join(FORMATS)})")
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    return InputFile(path=path, format=chosen, gzipped=gzipped)


def read_batches(source: InputFile, text_columns: tuple[str, ...] = ()
                 ) -> Iterator[pa.RecordBatch]:
    """The file's rows as record batches; ``IngestError`` on a malformed file.
    ``text_columns`` are read as strings whatever their values look like."""
    try:
        yield from _READERS[source.format](source, text_columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, EOFError, ValueError) as exc:
        where = locate_error(source)
        raise IngestError(f"{source.name}: {where or 'malformed'}: {_short(exc)}") from exc


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _stream(source: InputFile) -> pa.NativeFile:
    return pa.input_stream(str(source.path), compression="gzip" if source.gzipped else None)


def _parquet(source: InputFile, text_columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    if source.gzipped:
        raise IngestError(f"{source.name}: gzipped parquet is not supported (parquet "
                          "compresses its pages itself)")
    with pq.ParquetFile(str(source.path)) as parquet:
        yield from parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)


def _delimited(source: InputFile,
               text_columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    delimiter = "\t" if source.format == "tsv" else ","
    header = _header(source, delimiter)
    with _stream(source) as stream:
        reader = pa_csv.open_csv(
            stream,
            read_options=pa_csv.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                              quote_char='"' if delimiter == "," else False),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.string()),
                strings_can_be_null=True))
        yield from reader


def _header(source: InputFile, delimiter: str) -> list[str]:
    with _text(source) as handle:
        row = next(csv.reader(handle, delimiter=delimiter), None)
    if not row:
        raise IngestError(f"{source.name}: empty file (a header line is needed)")
    return row


def _jsonl(source: InputFile, text_columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    schema = pa.schema([(name, pa.string()) for name in text_columns])
    with _stream(source) as stream:
        yield from pa_json.open_json(
            stream, read_options=pa_json.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                               unexpected_field_behavior="infer"))


_READERS = {"parquet": _parquet, "csv": _delimited, "tsv": _delimited, "jsonl": _jsonl}


def _binary(source: InputFile) -> IO[bytes]:
    return cast(IO[bytes], gzip.open(source.path) if source.gzipped else source.path.open("rb"))


def _text(source: InputFile) -> IO[str]:
    return io.TextIOWrapper(_binary(source), encoding="utf-8", newline="")


def locate_error(source: InputFile) -> str | None:
    """``"line N"`` of the first line the standard library cannot parse, if any."""
    try:
        if source.format in ("csv", "tsv"):
            return _locate_delimited(source, "\t" if source.format == "tsv" else ",")
        if source.format == "jsonl":
            return _locate_jsonl(source)
    except (OSError, EOFError):
        return None
    return None


def _locate_delimited(source: InputFile, delimiter: str) -> str | None:
    with _text(source) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        width = None
        line = 0
        try:
            for row in reader:
                width = len(row) if width is None else width
                if len(row) != width:
                    return f"line {reader.line_num}: {len(row)} fields, the header has {width}"
                line = reader.line_num
        except (csv.Error, UnicodeDecodeError) as exc:
            return f"line {line + 1}: {exc}"
    return None


def _locate_jsonl(source: InputFile) -> str | None:
    with _binary(source) as raw:
        for number, line in enumerate(raw, start=1):
            if not line.strip():
                continue
            try:
                value: Any = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                return f"line {number}: {exc}"
            if not isinstance(value, dict):
                return f"line {number}: a JSON object is needed, not {type(value).__name__}"
    return None
