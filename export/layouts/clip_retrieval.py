"""clip-retrieval's layout (what ``clip-retrieval inference`` writes, what embedding-reader
and autofaiss read): ``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``,
``metadata/metadata_{i}.parquet`` for shard ``i`` from 0, the metadata row ``r`` describing
embedding row ``r``: the farm's columns, ``key`` = ``key_of(i, r)`` (unique across the
export), ``source_key`` the farm's key. No images (export ``webdataset`` beside it: same
numbering and keys when exported with the same options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.files import Staged, records_table
from export.layouts.base import Embeddings, ShardSink
from export.layouts.embeddings import EmbeddingRows
from export.layouts.webdataset import export_record
from export.source import Sample
from pairfarm.shardformat import PARQUET_COLUMNS


class ClipRetrievalShard:
    def __init__(self, dest: Path, index: int) -> None:
        self._dest, self._index = dest, index
        self._staged = Staged()
        self._emb = EmbeddingRows()
        self._records: list[dict[str, Any]] = []

    def add(self, sample: Sample, key: str, row: int) -> None:
        self._emb.add(sample)
        self._records.append(export_record(sample, key))

    def commit(self) -> list[Path]:
        self._emb.write(self._staged, self._dest, self._index,
                        records_table(self._records, PARQUET_COLUMNS))
        return self._staged.commit()

    def abort(self) -> None:
        self._staged.abort()


class ClipRetrievalLayout:
    name = "clip-retrieval"
    embeddings = Embeddings.REQUIRED

    def check(self, sample: Sample, embeddings: bool) -> None:
        return None

    def open_shard(self, dest: Path, index: int, *, embeddings: bool) -> ShardSink:
        return ClipRetrievalShard(dest, index)


LAYOUT = ClipRetrievalLayout()
