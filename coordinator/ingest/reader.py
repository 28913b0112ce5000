"""Input files as Arrow record batches, whatever their format.

Formats follow img2dataset: ``parquet``, ``csv``, ``tsv``, ``jsonl`` (one JSON object a
line), each optionally gzipped (``.gz``; parquet compresses inside). The format comes
from the file name unless given.

Error handling: a file that cannot be parsed raises ``IngestError`` naming the file and,
where it can be found, the line (1-based, the header line of CSV/TSV is line 1): Arrow does
not report line numbers, so after a failure the file is scanned again with the standard
library to find the first bad line. Text that is not valid UTF-8 is such a failure in every
format: each batch is checked (Arrow's CSV reader checks its own; its JSON and Parquet
readers do not, and PostgreSQL would refuse the bytes later); the scan decodes with
``surrogateescape`` so a bad byte is found on its own line, not at the start of the
decoder's chunk. Parquet has no lines: the row and the column are named instead.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
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
        first_row = 1
        for batch in _READERS[source.format](source, text_columns):
            _check_utf8(source, batch, first_row)
            first_row += batch.num_rows
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, EOFError, ValueError) as exc:
        where = locate_error(source)
        raise IngestError(f"{source.name}: {where}" if where else
                          f"{source.name}: malformed: {_short(exc)}") from exc


def _check_utf8(source: InputFile, batch: pa.RecordBatch, first_row: int) -> None:
    """Raise ``ArrowInvalid`` (a file with lines: the scan names the line) or
    ``IngestError`` (parquet: naming row and column) when a string is not UTF-8."""
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid:
        if source.format != "parquet":
            raise
        raise IngestError(f"{source.name}: {_locate_in_batch(batch, first_row)}") from None


def _locate_in_batch(batch: pa.RecordBatch, first_row: int) -> str:
    """``"row N, column 'c': ..."`` of the first string in ``batch`` that is not UTF-8."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as exc:
            return _locate_in_column(name, column, first_row) or f"column {name!r}: {exc}"
    return "a value is not valid UTF-8"


def _locate_in_column(name: str, column: pa.Array, first_row: int) -> str | None:
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}.get(column.type)
    if binary is None:
        return None
    for index, raw in enumerate(column.view(binary).to_pylist()):
        if raw is None:
            continue
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            return (f"row {first_row + index}, column {name!r}: not valid UTF-8 "
                    f"(byte 0x{raw[exc.start]:02x})")
    return None


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
    bad = _undecoded_in_row(row, 1, [])
    if bad:
        raise IngestError(f"{source.name}: {bad}")
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
    """The file as text; a byte that is not UTF-8 becomes a lone surrogate (U+DC80-U+DCFF),
    found by ``_UNDECODED`` on the line that holds it."""
    return io.TextIOWrapper(_binary(source), encoding="utf-8", errors="surrogateescape",
                            newline="")


#: what ``surrogateescape`` decodes an invalid byte to
_UNDECODED = re.compile("[\udc80-\udcff]")


def _not_utf8(line: int, char: str, column: str | None) -> str:
    named = column is not None and not _UNDECODED.search(column)
    where = f" in column {column!r}" if named else ""
    return f"line {line}: not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x}{where})"


def _undecoded_in_row(row: list[str], first_line: int, header: list[str]) -> str | None:
    """The line and column of the first undecodable byte of a record that began on
    ``first_line`` (a quoted field may span lines), or None."""
    newlines = 0
    for index, value in enumerate(row):
        found = _UNDECODED.search(value)
        if found is not None:
            line = first_line + newlines + value[:found.start()].count("\n")
            return _not_utf8(line, found.group(), header[index] if index < len(header)
                             else None)
        newlines += value.count("\n")
    return None


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
        header: list[str] | None = None
        line = 0
        try:
            for row in reader:
                header = row if header is None else header
                bad = _undecoded_in_row(row, line + 1, header)
                if bad:
                    return bad
                if len(row) != len(header):
                    return (f"line {reader.line_num}: {len(row)} fields, the header has "
                            f"{len(header)}")
                line = reader.line_num
        except csv.Error as exc:
            return f"line {line + 1}: {exc}"
    return None


def _locate_jsonl(source: InputFile) -> str | None:
    with _binary(source) as raw:
        for number, line in enumerate(raw, start=1):
            if not line.strip():
                continue
            found = _jsonl_line_error(number, line.decode("utf-8", "surrogateescape"))
            if found:
                return found
    return None


def _jsonl_line_error(number: int, text: str) -> str | None:
    try:
        value: Any = json.loads(text)
    except ValueError as exc:
        return f"line {number}: {exc}"
    if not isinstance(value, dict):
        return f"line {number}: a JSON object is needed, not {type(value).__name__}"
    undecoded = _UNDECODED.search(text)
    if undecoded is not None:
        column = next((k for k, v in value.items()
                       if isinstance(v, str) and _UNDECODED.search(v)), None)
        return _not_utf8(number, undecoded.group(), column)
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return f"line {number}: a \\u escape that is no character (a lone surrogate)"
    return None
