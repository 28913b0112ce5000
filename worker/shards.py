"""Write one download shard: webdataset tar, metadata parquet, stats json (last).

Layout and names come from ``pairfarm.shardformat``. Storage is any fsspec location: a
local or shared directory, or ``s3://...`` and the like when the matching fsspec
package is installed.

Resource handling: ``ShardWriter`` opens the tar under a hidden temporary name when it
is created; ``commit`` closes it, writes the parquet under a temporary name, renames
both, then writes the stats json the same way: its presence marks the shard complete.
``abort`` removes the temporary files. All methods block: call them from a thread.

Error handling: storage errors (``OSError`` and fsspec's) become ``ShardWriteError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

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
    stats_name,
    status_dict_of,
    status_of,
    tar_name,
)
from worker.errors import ShardWriteError
from worker.imaging import ProcessedImage

T = TypeVar("T")
_MTIME = 0  # reproducible tars: every member has the same timestamp
_DETAIL_CHARS = 300
_TYPES: dict[str, pa.DataType] = {
    "key": pa.string(), "url": pa.string(), "caption": pa.string(), "status": pa.string(),
    "error_class": pa.string(), "width": pa.int32(), "height": pa.int32(),
    "original_width": pa.int32(), "original_height": pa.int32(), "sha256": pa.string(),
    "error_message": pa.string(), "attempt": pa.int16(), "final": pa.bool_(),
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


def _row(sample: Sample, batch_id: int, url_retries: int) -> dict[str, Any]:
    image = sample.image
    attempt = sample.candidate.attempt
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
    }


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += len(view)
        self._target.write(view)
        return len(view)


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
    _rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    _retry: dict[int, tuple[str, int]] = field(default_factory=dict)
    _extras: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    _tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        _guard("create output directory", lambda: self.fs.makedirs(self.directory, exist_ok=True))
        self._tar_file = _guard("open tar", lambda: self.fs.open(self._tmp(tar_name), "wb"))
        self._hasher = _HashingWriter(self._tar_file)
        # closed by commit() or abort(): the writer owns the open tar across calls
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._hasher, mode="w|", format=tarfile.PAX_FORMAT)

    def _path(self, name_of: Callable[[int], str]) -> str:
        return f"{self.directory.rstrip('/')}/{name_of(self.batch_id)}"

    def _tmp(self, name_of: Callable[[int], str]) -> str:
        return f"{self.directory.rstrip('/')}/.{name_of(self.batch_id)}.tmp-{self._tag}"

    def add(self, sample: Sample) -> None:
        """Record the sample's row; write its tar members when it is ok."""
        row = _row(sample, self.batch_id, self.url_retries)
        self._rows[sample.index] = row
        if not row["final"]:
            self._retry[sample.index] = (sample.outcome.value, sample.candidate.id)
        self._extras[sample.index] = sample.candidate.extra
        if sample.image is not None:
            _guard("write tar", lambda: self._write_members(row, sample))

    def _write_members(self, row: dict[str, Any], sample: Sample) -> None:
        assert sample.image is not None
        meta = {**row, **sample.candidate.extra}
        self._member(f"{row['key']}.{self.image_ext}", sample.image.data)
        self._member(f"{row['key']}.txt", sample.candidate.caption.encode())
        self._member(f"{row['key']}.json", json.dumps(meta, default=str).encode())

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def commit(self, stats: ShardStats) -> ShardFiles:
        """Finish the shard: tar, then parquet, then the stats json (the done marker)."""
        _guard("close tar", self._close_tar)
        parquet = self._parquet_bytes()
        _guard("write parquet", lambda: self._put(parquet, parquet_name))
        _guard("rename tar", lambda: self.fs.mv(self._tmp(tar_name), self._path(tar_name)))
        stats_json = json.dumps(self.stats_dict(stats), indent=1).encode()
        _guard("write stats", lambda: self._put(stats_json, stats_name))
        return ShardFiles(tar=self._url(tar_name), parquet=self._url(parquet_name),
                          stats=self._url(stats_name), tar_sha256=self._hasher.sha256.hexdigest(),
                          parquet_sha256=hashlib.sha256(parquet).hexdigest(),
                          tar_bytes=self._hasher.size)

    def _close_tar(self) -> None:
        self._tar.close()
        self._tar_file.close()

    def _put(self, data: bytes, name_of: Callable[[int], str]) -> None:
        with self.fs.open(self._tmp(name_of), "wb") as out:
            out.write(data)
        self.fs.mv(self._tmp(name_of), self._path(name_of))

    def _url(self, name_of: Callable[[int], str]) -> str:
        return str(self.fs.unstrip_protocol(self._path(name_of)))

    def abort(self) -> None:
        """Drop the temporary files (best effort: the shard is abandoned anyway)."""
        for close in (self._tar.close, self._tar_file.close):
            try:
                close()
            except (OSError, ValueError):
                continue
        for name_of in (tar_name, parquet_name, stats_name):
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

    def _parquet_bytes(self) -> bytes:
        order = sorted(self._rows)
        columns = {name: [self._rows[i][name] for i in order] for name in _COLUMNS}
        arrays = {name: pa.array(values, type=_TYPES[name])
                  for name, values in columns.items()}
        arrays.update(_extra_arrays([self._extras[i] for i in order], set(arrays)))
        out = io.BytesIO()
        pq.write_table(pa.table(arrays), out)
        return out.getvalue()


def _extra_arrays(extras: list[Mapping[str, Any]], taken: set[str]) -> dict[str, pa.Array]:
    names = sorted({name for extra in extras for name in extra} - taken)
    return {name: _column([extra.get(name) for extra in extras]) for name in names}


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])

