"""The shard layout that download workers write and post-processing reads.

A download shard for batch N is three files in the output location:

- ``{N:08d}.tar``: webdataset; members ``{key}.jpg`` (or ``.png``, ``.webp``), ``{key}.txt``
  (caption) and ``{key}.json`` (metadata), only for samples whose outcome is ``ok``.
- ``{N:08d}.parquet``: one row per candidate of the batch, in key order, failures
  included. Columns: see ``PARQUET_COLUMNS``, ``error_message``, ``ATTEMPT_COLUMNS``,
  those of ``OPTIONAL_COLUMNS`` the settings ask for, then the ingest's extra columns.
  ``status`` is img2dataset's (``status_of``); ``error_class`` the ``Outcome`` of a
  failure.
- ``{N:08d}_stats.json``: img2dataset's stats keys (``STATS_KEYS``) with its meaning,
  ``status_dict`` from ``status_dict_of``; written last: it marks the shard done.

The key of a sample is unique across the farm, img2dataset's scheme with a fixed row
width: ``key_of(shard, row) = f"{shard * 10**KEY_ROW_DIGITS + row:0{KEY_WIDTH}d}"``, the
shard's 8-digit stem followed by the row's 6 digits (``00000042000007``: batch 42, row 7);
``split_key`` recovers both. A batch has at most 1,000,000 rows (the coordinator's bound),
so the row always fits. Exports number their own shards from 0 with the same scheme.
"""

from __future__ import annotations

from collections.abc import Mapping

from pairfarm.outcomes import RESIZE_FAILURES, TRANSIENT, Outcome

#: digits of the row in a key; a shard holds at most ``10**KEY_ROW_DIGITS`` rows
KEY_ROW_DIGITS = 6
#: digits of the shard number in a key (as in the shard's stem)
KEY_SHARD_DIGITS = 8
KEY_WIDTH = KEY_SHARD_DIGITS + KEY_ROW_DIGITS
MAX_SHARD_ROWS = 10**KEY_ROW_DIGITS

#: img2dataset's ``status`` values; the outcome class itself is in ``error_class``
#: (null for a success).
STATUS_SUCCESS = "success"
STATUS_FAILED_TO_DOWNLOAD = "failed_to_download"
STATUS_FAILED_TO_RESIZE = "failed_to_resize"

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

#: A row's attempt at its URL (1, or more when an earlier batch sent it back) and whether
#: its outcome is the URL's final one (``is_final``): a row with ``final`` false has a
#: later row, of a higher attempt, in another batch's shard. Each candidate has exactly
#: one final row among the farm's shards (none when its last batch failed for good).
ATTEMPT_COLUMNS: tuple[str, ...] = ("attempt", "final")

#: Columns a shard has when the worker's settings ask for them, after the attempt
#: columns (img2dataset's names): ``exif`` (``--extract-exif``, JSON text of the EXIF
#: tags) and the ``--compute-hash`` digest of the downloaded bytes when it is not
#: ``sha256`` (always written).
OPTIONAL_COLUMNS: tuple[str, ...] = ("exif", "md5", "sha512")

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


def status_of(outcome: Outcome) -> str:
    """img2dataset's status for an outcome: success, failed_to_download or failed_to_resize."""
    if outcome is Outcome.OK:
        return STATUS_SUCCESS
    if outcome in RESIZE_FAILURES:
        return STATUS_FAILED_TO_RESIZE
    return STATUS_FAILED_TO_DOWNLOAD


def status_dict_of(outcome_counts: Mapping[str, int]) -> dict[str, int]:
    """The stats json's ``status_dict`` from counts by outcome class: failures under
    their class (img2dataset keys them by its error message), successes under
    img2dataset's ``"success"``; the values sum to ``count``, as in img2dataset."""
    counts = {STATUS_SUCCESS if name == Outcome.OK.value else name: n
              for name, n in outcome_counts.items() if n}
    return dict(sorted(counts.items()))


def is_final(outcome: Outcome, attempt: int, url_retries: int) -> bool:
    """False when the coordinator tries the URL again: a transient outcome at an attempt
    of at most ``url_retries`` (the lease's)."""
    return outcome not in TRANSIENT or attempt > url_retries


def outcome_of(status: str, error_class: str | None) -> Outcome:
    """The outcome class of a parquet row (the inverse of ``status_of`` + ``error_class``)."""
    if status == STATUS_SUCCESS:
        return Outcome.OK
    if error_class is None:
        raise ValueError(f"a {status!r} row without an error_class")
    return Outcome(error_class)


def shard_stem(batch_id: int) -> str:
    return f"{batch_id:08d}"


def tar_name(batch_id: int) -> str:
    return f"{shard_stem(batch_id)}.tar"


def parquet_name(batch_id: int) -> str:
    return f"{shard_stem(batch_id)}.parquet"


def stats_name(batch_id: int) -> str:
    return f"{shard_stem(batch_id)}_stats.json"


def embedding_files(stem: str) -> dict[str, str]:
    """clip-retrieval's embedding layout (embedding-reader and autofaiss read it), relative
    to its folder: ``img_emb`` / ``text_emb`` (float16, L2-normalised, one row per sample)
    and ``metadata`` (one parquet row per embedding row), for the shard named ``stem``."""
    return {"img_emb": f"img_emb/img_emb_{stem}.npy",
            "text_emb": f"text_emb/text_emb_{stem}.npy",
            "metadata": f"metadata/metadata_{stem}.parquet"}


def key_of(shard: int, row: int) -> str:
    """The webdataset key of the sample at ``row`` of shard (batch) ``shard``: unique
    across shards, the row recoverable (``split_key``)."""
    if not 0 <= row < MAX_SHARD_ROWS or shard < 0:
        raise ValueError(f"no key for row {row} of shard {shard}: a shard has at most "
                         f"{MAX_SHARD_ROWS} rows")
    return f"{shard * MAX_SHARD_ROWS + row:0{KEY_WIDTH}d}"


def split_key(key: str) -> tuple[int, int]:
    """``(shard, row)`` of a key made by ``key_of``."""
    return divmod(int(key), MAX_SHARD_ROWS)
