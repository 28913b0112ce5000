"""The shard layout that download workers write and post-processing reads.

A download shard for batch N is three files in the output location:

- ``{N:08d}.tar``: webdataset; members ``{key}.jpg`` (or ``.webp``), ``{key}.txt``
  (caption) and ``{key}.json`` (metadata), only for samples whose outcome is ``ok``.
- ``{N:08d}.parquet``: one row per candidate of the batch, in key order, failures
  included. Columns: see ``PARQUET_COLUMNS`` plus the ingest's extra columns.
- ``{N:08d}_stats.json``: img2dataset's stats keys; written last: it marks the shard done.

The key of a sample is its row index in the batch (``key_of(i)``), so that the TFDS
``laion400m`` reader finds a sample's metadata by the integer of its key.
"""

from __future__ import annotations

KEY_WIDTH = 9

#: Parquet columns every download shard has, in this order (extra ingest columns follow).
PARQUET_COLUMNS: tuple[str, ...] = (
    "key",
    "url",
    "caption",
    "status",
    "error_class",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)

#: Keys of the per-shard stats json (img2dataset's names).
STATS_KEYS: tuple[str, ...] = (
    "count",
    "successes",
    "failed_to_download",
    "failed_to_resize",
    "duration",
    "start_time",
    "end_time",
    "status_dict",
)


def shard_stem(batch_id: int) -> str:
    return f"{batch_id:08d}"


def tar_name(batch_id: int) -> str:
    return f"{shard_stem(batch_id)}.tar"


def parquet_name(batch_id: int) -> str:
    return f"{shard_stem(batch_id)}.parquet"


def stats_name(batch_id: int) -> str:
    return f"{shard_stem(batch_id)}_stats.json"


def key_of(index: int) -> str:
    """The webdataset key of the sample at row ``index`` of its batch."""
    return f"{index:0{KEY_WIDTH}d}"
