"""Write one download shard: webdataset tar, metadata parquet, stats json (last).

Layout and names come from ``pairfarm.shardformat``; ``pairfarm download`` may put the
samples in img2dataset's other layouts instead of the tar (``worker.layouts``: a
``files`` folder, or the image bytes in the ``parquet``). Storage is any fsspec
location: a local or shared directory, or ``s3://...`` and the like when the matching
fsspec package is installed.

Resource handling: ``ShardWriter`` opens the tar (or the layout's members) under a
hidden temporary name when it is created; ``commit`` (``publish`` for any layout)
closes it, writes the parquet under a temporary name, renames both, then writes the
stats json the same way: its presence marks the shard complete. ``abort`` removes the
temporary files. All methods block: call them from a thread.

Error handling: storage errors (``OSError`` and fsspec's) become ``ShardWriteError``.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pairfarm.outcomes import Outcome
from pairfarm.protocol import Candidate, ShardFiles
from pairfarm.shardformat import (
    ATTEMPT_COLUMNS,
    PARQUET_COLUMNS,
    is_final,
    key_of,
    parquet_name,
    shard_stem,
    stats_name,
    status_dict_of,
    status_of,
    tar_name,
)
from worker.errors import ShardWriteError
from worker.imaging import ProcessedImage
from worker.layouts import HashingWriter, Members, TarMembers, open_members

T = TypeVar("T")
_DETAIL_CHARS = 300
#: parquet rows written at a time (the parquet layout reads their images back for it)
_ROW_GROUP = 512
_TYPES: dict[str, pa.DataType] = {
    "key": pa.string(), "url": pa.string(), "caption": pa.string(), "status": pa.string(),
    "error_class": pa.string(), "width": pa.int32(), "height": pa.int32(),
    "original_width": pa.int32(), "original_height": pa.int32(), "sha256": pa.string(),
    "error_message": pa.string(), "attempt": pa.int16(), "final": pa.bool_(),
    "exif": pa.string(), "md5": pa.string(), "sha512": pa.string(),
}
#: the shared columns in their order, then our free-text detail, the attempt columns,
#: then the ingest's extras
_COLUMNS: tuple[str, ...] = (*PARQUET_COLUMNS, "error_message", *ATTEMPT_COLUMNS)


@dataclass(frozen=True, slots=True)
class Sample:
    """One candidate's result: its outcome and, when ok, its image."""

    index: int
    candidate: Candidate
    outcome: Outcome
    detail: str = ""
    image: ProcessedImage | None = None


@dataclass(frozen=True, slots=True)
class ShardStats:
    start_time: float
    end_time: float
    bytes_downloaded: int


def _row(sample: Sample, batch_id: int, url_retries: int,
         columns: tuple[str, ...]) -> dict[str, Any]:
    image = sample.image
    attempt = sample.candidate.attempt
    optional = dict(image.digests, exif=image.exif) if image else {}
    return {
        "key": key_of(batch_id, sample.index), "url": sample.candidate.url,
        "caption": sample.candidate.caption, "status": status_of(sample.outcome),
        "error_class": None if sample.outcome is Outcome.OK else sample.outcome.value,
        "width": image.width if image else None, "height": image.height if image else None,
        "original_width": image.original_width if image else None,
        "original_height": image.original_height if image else None,
        "sha256": image.sha256 if image else None,
        "error_message": sample.detail[:_DETAIL_CHARS] or None,
        "attempt": attempt, "final": is_final(sample.outcome, attempt, url_retries),
        **{name: optional.get(name) for name in columns},
    }


def _guard(action: str, func: Callable[[], T]) -> T:
    try:
        return func()
    except (OSError, ValueError) as exc:
        raise ShardWriteError(f"{action}: {exc}") from exc


@dataclass
class ShardWriter:
    """Writes the shard of ``batch_id`` into ``directory`` on ``fs``. Blocking."""

    fs: fsspec.AbstractFileSystem
    directory: str
    batch_id: int
    image_ext: str = "jpg"
    #: the lease's ``url_retries``: a transient outcome at an attempt up to it is not
    #: final (``retry_requests``)
    url_retries: int = 0
    #: ``OPTIONAL_COLUMNS`` this shard has (``exif``, ``md5``, ``sha512``), after the
    #: attempt columns
    columns: tuple[str, ...] = ()
    #: ``worker.layouts.LAYOUTS``: where the ``ok`` samples go (``commit`` needs the tar)
    layout: str = "webdataset"
    _rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    _retry: dict[int, tuple[str, int]] = field(default_factory=dict)
    _extras: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    _tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        _guard("create output directory", lambda: self.fs.makedirs(self.directory, exist_ok=True))
        name_of = tar_name if self.layout == "webdataset" else shard_stem
        self._members: Members = _guard("open shard", lambda: open_members(
            self.layout, self.fs, self._tmp(name_of), self._path(name_of), self.image_ext))

    def _path(self, name_of: Callable[[int], str]) -> str:
        return f"{self.directory.rstrip('/')}/{name_of(self.batch_id)}"

    def _tmp(self, name_of: Callable[[int], str]) -> str:
        return f"{self.directory.rstrip('/')}/.{name_of(self.batch_id)}.tmp-{self._tag}"

    def add(self, sample: Sample) -> None:
        """Record the sample's row; write its tar members when it is ok."""
        row = _row(sample, self.batch_id, self.url_retries, self.columns)
        self._rows[sample.index] = row
        if not row["final"]:
            self._retry[sample.index] = (sample.outcome.value, sample.candidate.id)
        self._extras[sample.index] = sample.candidate.extra
        if sample.image is not None:
            _guard("write samples", lambda: self._write_members(row, sample))

    def _write_members(self, row: dict[str, Any], sample: Sample) -> None:
        assert sample.image is not None
        meta = {**row, **sample.candidate.extra}
        self._members.add(row["key"], [
            (self.image_ext, sample.image.data), ("txt", sample.candidate.caption.encode()),
            ("json", json.dumps(meta, default=str).encode())])

    def commit(self, stats: ShardStats) -> ShardFiles:
        """Finish a ``webdataset`` shard (``publish``) and say where its files are."""
        tar = self._members
        assert isinstance(tar, TarMembers), "the farm's shards are webdataset"
        parquet_sha256 = self.publish(stats)
        return ShardFiles(tar=self._url(tar_name), parquet=self._url(parquet_name),
                          stats=self._url(stats_name), tar_sha256=tar.hasher.sha256.hexdigest(),
                          parquet_sha256=parquet_sha256, tar_bytes=tar.hasher.size)

    def publish(self, stats: ShardStats) -> str:
        """Finish the shard: samples, then parquet, then the stats json (the done marker).
        Returns the parquet's sha256."""
        _guard("close shard", self._members.close)
        parquet_sha256 = _guard("write parquet", self._write_parquet)
        _guard("rename shard", self._members.publish)
        stats_json = json.dumps(self.stats_dict(stats), indent=1).encode()
        _guard("write stats", lambda: self._put(stats_json, stats_name))
        return parquet_sha256

    def _put(self, data: bytes, name_of: Callable[[int], str]) -> None:
        with self.fs.open(self._tmp(name_of), "wb") as out:
            out.write(data)
        self.fs.mv(self._tmp(name_of), self._path(name_of))

    def _url(self, name_of: Callable[[int], str]) -> str:
        return str(self.fs.unstrip_protocol(self._path(name_of)))

    def abort(self) -> None:
        """Drop the temporary files (best effort: the shard is abandoned anyway)."""
        self._members.abort()
        for name_of in (parquet_name, stats_name):
            try:
                if self.fs.exists(self._tmp(name_of)):
                    self.fs.rm(self._tmp(name_of))
            except OSError:
                continue

    def retry_requests(self) -> dict[str, list[int]]:
        """The candidates whose row is not final, by outcome class: the report's
        ``retry``."""
        by_class: dict[str, list[int]] = {}
        for index in sorted(self._retry):
            outcome, candidate_id = self._retry[index]
            by_class.setdefault(outcome, []).append(candidate_id)
        return by_class

    def outcome_counts(self) -> Counter[str]:
        return Counter(row["error_class"] or Outcome.OK.value for row in self._rows.values())

    def stats_dict(self, stats: ShardStats) -> dict[str, Any]:
        counts = Counter(row["status"] for row in self._rows.values())
        return {
            "count": len(self._rows), "successes": counts["success"],
            "failed_to_download": counts["failed_to_download"],
            "failed_to_resize": counts["failed_to_resize"],
            "duration": stats.end_time - stats.start_time,
            "start_time": stats.start_time, "end_time": stats.end_time,
            "status_dict": status_dict_of(self.outcome_counts()),
            "bytes_downloaded": stats.bytes_downloaded, "batch_id": self.batch_id,
        }

    def _table(self) -> pa.Table:
        order = sorted(self._rows)
        columns = {name: [self._rows[i][name] for i in order]
                   for name in (*_COLUMNS, *self.columns)}
        arrays = {name: pa.array(values, type=_TYPES[name])
                  for name, values in columns.items()}
        arrays.update(_extra_arrays([self._extras[i] for i in order], set(arrays)))
        return pa.table(arrays)

    def _write_parquet(self) -> str:
        """The parquet under its temporary name, ``_ROW_GROUP`` rows at a time with the
        layout's columns, then renamed; returns its sha256."""
        table = self._table()
        with self.fs.open(self._tmp(parquet_name), "wb") as out:
            hasher = HashingWriter(out)
            writer: pq.ParquetWriter | None = None
            for start in range(0, max(table.num_rows, 1), _ROW_GROUP):
                chunk = self._with_layout(table.slice(start, _ROW_GROUP))
                writer = writer or pq.ParquetWriter(hasher, chunk.schema)
                writer.write_table(chunk)
            assert writer is not None
            writer.close()
        self.fs.mv(self._tmp(parquet_name), self._path(parquet_name))
        return hasher.sha256.hexdigest()

    def _with_layout(self, chunk: pa.Table) -> pa.Table:
        extra = self._members.parquet_columns(chunk.column("key").to_pylist())
        for name, array in extra.items():  # an input column of that name gives way
            if name in chunk.column_names:
                chunk = chunk.remove_column(chunk.column_names.index(name))
            chunk = chunk.append_column(name, array)
        return chunk


def _extra_arrays(extras: list[Mapping[str, Any]], taken: set[str]) -> dict[str, pa.Array]:
    names = sorted({name for extra in extras for name in extra} - taken)
    return {name: _column([extra.get(name) for extra in extras]) for name in names}


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])

