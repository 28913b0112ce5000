"""TensorFlow Datasets' ``laion400m`` layout.

The ``images`` config reads ``manual_dir/{i:05d}.tar`` and ``{i:05d}.parquet`` for
``i`` in ``0..num_shards-1``; for each image member of the tar it takes the parquet row
whose index is the integer of the member's stem. So here shard ``i``'s members are named
by their row (``000003.jpg`` is row 3), and its parquet has one row per sample with
TFDS's columns: ``caption``, ``NSFW`` (``UNLIKELY`` / ``UNSURE`` / ``NSFW`` /
``UNTAGGED``), ``similarity`` (-1.0 when missing), ``LICENSE``, ``url``,
``original_width``, ``original_height``, then ``key`` (``key_of(i, row)``, unique across
the export) and ``source_key`` (the farm's).

The ``embeddings`` config reads ``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``
and ``metadata/metadata_{i}.parquet`` (LAION's embedding folders: the same parquet,
aligned row for row) with 512-wide float16 embeddings: written beside the images when the
source is post-processed, and refused (``--no-embeddings``) for another width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from export.errors import LayoutError
from export.files import Staged, TarSink, write_parquet
from export.layouts.base import Embeddings, ShardSink
from export.layouts.embeddings import EmbeddingRows, width
from export.source import Sample
from pairfarm.shardformat import KEY_ROW_DIGITS

#: TFDS's laion400m declares its embeddings (512,) float16 (CLIP ViT-B/32)
TFDS_EMBEDDING_WIDTH = 512
MISSING_SIMILARITY = -1.0
NSFW_TAGS = ("UNLIKELY", "UNSURE", "NSFW", "UNTAGGED")


def tfds_record(sample: Sample, key: str) -> dict[str, Any]:
    r = sample.record
    similarity = r.get("similarity")
    license_ = r.get("LICENSE", r.get("license"))
    return {"caption": sample.caption,
            "NSFW": r.get("NSFW") if r.get("NSFW") in NSFW_TAGS else "UNTAGGED",
            "similarity": MISSING_SIMILARITY if similarity is None else float(similarity),
            "LICENSE": None if license_ is None else str(license_),
            "url": r.get("url"), "original_width": r.get("original_width"),
            "original_height": r.get("original_height"), "key": key,
            "source_key": r.get("key")}


SCHEMA = pa.schema([("caption", pa.string()), ("NSFW", pa.string()),
                    ("similarity", pa.float64()), ("LICENSE", pa.string()),
                    ("url", pa.string()), ("original_width", pa.int32()),
                    ("original_height", pa.int32()), ("key", pa.string()),
                    ("source_key", pa.string())])


class TfdsShard:
    def __init__(self, dest: Path, index: int, *, embeddings: bool) -> None:
        self._dest, self._index = dest, index
        self._staged = Staged()
        self._tar = TarSink(self._staged, dest / f"{index:05d}.tar")
        self._emb = EmbeddingRows() if embeddings else None
        self._records: list[dict[str, Any]] = []

    def add(self, sample: Sample, key: str, row: int) -> None:
        stem = f"{row:0{KEY_ROW_DIGITS}d}"  # TFDS: int(stem) is the parquet row
        self._tar.add(f"{stem}.{sample.image_ext}", sample.image)
        self._tar.add(f"{stem}.txt", sample.caption.encode())
        self._records.append(tfds_record(sample, key))
        if self._emb is not None:
            self._emb.add(sample)

    def commit(self) -> list[Path]:
        self._tar.close()
        table = pa.Table.from_pylist(self._records, schema=SCHEMA)
        if self._emb is not None:
            self._emb.write(self._staged, self._dest, self._index, table)
        write_parquet(self._staged, self._dest / f"{self._index:05d}.parquet", table)
        return self._staged.commit()

    def abort(self) -> None:
        self._tar.close()
        self._staged.abort()


class TfdsLayout:
    name = "tfds-laion400m"
    embeddings = Embeddings.OPTIONAL

    def check(self, sample: Sample, embeddings: bool) -> None:
        if embeddings and width(sample) != TFDS_EMBEDDING_WIDTH:
            raise LayoutError(
                f"TFDS's laion400m reads {TFDS_EMBEDDING_WIDTH}-wide embeddings; these are "
                f"{width(sample)} wide (post-process with a {TFDS_EMBEDDING_WIDTH}-wide model "
                "such as ViT-B-32, or export the images only: --no-embeddings)")

    def open_shard(self, dest: Path, index: int, *, embeddings: bool) -> ShardSink:
        return TfdsShard(dest, index, embeddings=embeddings)


LAYOUT = TfdsLayout()
