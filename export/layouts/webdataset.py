"""img2dataset's webdataset layout, shards numbered from ``00000000``.

Per shard ``i`` (stem ``%08d``): ``i.tar`` (``KEY.jpg|webp|png``, ``KEY.txt``,
``KEY.json``), ``i.parquet`` (one row per sample, in tar order: the farm's columns with
``key`` the export's key and ``source_key`` the farm's), ``i_stats.json`` (img2dataset's
keys; written last). ``KEY`` = ``key_of(i, row)``: unique across the export, the row
recoverable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from export.files import Staged, TarSink, records_table, write_json, write_parquet
from export.layouts.base import Embeddings, ShardSink
from export.source import Sample
from pairfarm.shardformat import PARQUET_COLUMNS, STATUS_SUCCESS, shard_stem


def export_record(sample: Sample, key: str) -> dict[str, Any]:
    """The sample's parquet row under its export key (the farm's key as ``source_key``)."""
    return {**sample.record, "key": key, "source_key": sample.record.get("key")}


def shard_stats(count: int, start: float) -> dict[str, Any]:
    """img2dataset's stats json for a shard of ``count`` samples (all successes)."""
    end = time.time()
    return {"count": count, "successes": count, "failed_to_download": 0,
            "failed_to_resize": 0, "duration": end - start, "start_time": start,
            "end_time": end, "status_dict": {STATUS_SUCCESS: count} if count else {}}


class WebdatasetShard:
    def __init__(self, dest: Path, index: int) -> None:
        self._stem = dest / shard_stem(index)
        self._staged = Staged()
        self._tar = TarSink(self._staged, self._stem.with_suffix(".tar"))
        self._records: list[dict[str, Any]] = []
        self._start = time.time()

    def add(self, sample: Sample, key: str, row: int) -> None:
        record = export_record(sample, key)
        self._tar.add(f"{key}.{sample.image_ext}", sample.image)
        self._tar.add(f"{key}.txt", sample.caption.encode())
        meta = {**sample.meta, "key": key, "source_key": record["source_key"]}
        self._tar.add(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
        self._records.append(record)

    def commit(self) -> list[Path]:
        self._tar.close()
        write_parquet(self._staged, self._stem.with_suffix(".parquet"),
                      records_table(self._records, PARQUET_COLUMNS))
        write_json(self._staged, self._stem.with_name(f"{self._stem.name}_stats.json"),
                   shard_stats(len(self._records), self._start))
        return self._staged.commit()

    def abort(self) -> None:
        self._tar.close()
        self._staged.abort()


class WebdatasetLayout:
    name = "webdataset"
    embeddings = Embeddings.NONE

    def check(self, sample: Sample, embeddings: bool) -> None:
        return None

    def open_shard(self, dest: Path, index: int, *, embeddings: bool) -> ShardSink:
        return WebdatasetShard(dest, index)


LAYOUT = WebdatasetLayout()
