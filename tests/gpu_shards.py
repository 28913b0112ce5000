"""Tiny download shards in ``pairfarm.shardformat``'s layout, built inside the tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pairfarm.outcomes import Outcome
from pairfarm.protocol import ShardFiles
from pairfarm.shardformat import (
    PARQUET_COLUMNS,
    key_of,
    parquet_name,
    stats_name,
    status_of,
    tar_name,
)


@dataclass(frozen=True)
class Row:
    caption: str
    image: bytes | None  # None: the download failed
    language: str | None = "en"
    status: str = Outcome.OK.value
    license: str | None = None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_shard(folder: Path, batch_id: int, rows: list[Row]) -> ShardFiles:
    folder.mkdir(parents=True, exist_ok=True)
    tar_path, pq_path = folder / tar_name(batch_id), folder / parquet_name(batch_id)
    columns: dict[str, list[object]] = {c: [] for c in PARQUET_COLUMNS}
    columns.update(language=[], LICENSE=[])
    with tarfile.open(tar_path, "w") as tar:
        for i, row in enumerate(rows):
            key = key_of(batch_id, i)
            ok = row.image is not None and row.status == Outcome.OK.value
            failure = Outcome.HTTP_4XX if row.status == Outcome.OK.value else Outcome(row.status)
            values = {"key": key, "url": f"http://127.0.0.1/img/{i}.jpg",
                      "caption": row.caption,
                      "status": status_of(Outcome.OK if ok else failure),
                      "error_class": None if ok else failure.value,
                      "width": 64 if ok else None, "height": 64 if ok else None,
                      "original_width": 640 if ok else None,
                      "original_height": 480 if ok else None,
                      "sha256": hashlib.sha256(row.image).hexdigest() if ok and row.image
                      else None, "language": row.language, "LICENSE": row.license}
            for name, value in values.items():
                columns[name].append(value)
            if ok and row.image is not None:
                _add(tar, f"{key}.jpg", row.image)
                _add(tar, f"{key}.txt", row.caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "url": values["url"],
                                                     "caption": row.caption}).encode())
    pq.write_table(pa.table(columns), pq_path)
    stats = folder / stats_name(batch_id)
    stats.write_text(json.dumps({"count": len(rows)}))
    return ShardFiles(tar=str(tar_path), parquet=str(pq_path), stats=str(stats),
                      tar_sha256=_sha(tar_path), parquet_sha256=_sha(pq_path),
                      tar_bytes=tar_path.stat().st_size)
