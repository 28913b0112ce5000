"""Candidate parquet shards: the columns, and a writer that publishes complete shards only.

Columns (img2dataset's input names first, so ``pairfarm ingest`` reads them with its
defaults ``--url-col url --caption-col caption`` and keeps the others):

=================  =======  ===========================================================
``url``            string   the image URL, absolute http(s), no fragment
``caption``        string   the alt text, entities decoded, whitespace collapsed
``page_url``       string   the page the image is on (WARC-Target-URI)
``language``       string   ``en``, another language code, or ``nolang``
``language_score`` float32  the detector's probability of its most probable language
``source``         string   the WAT file or URL the candidate came from
=================  =======  ===========================================================

Shard files are ``{run_id}-{n:05d}.parquet`` in the output directory, rows in input-file
order (deterministic: the same inputs give the same shards).

Resource handling: a shard is written as ``<name>.parquet.tmp`` and renamed when it holds
``rows_per_shard`` rows or the run ends, so a reader (or ``pairfarm ingest``) never sees a
half-written shard; ``on_shard`` is called after each rename. ``close`` (also on error)
finishes the open shard (an empty one is removed); leaving with an exception publishes it
without calling ``on_shard``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("url", pa.string()),
    ("caption", pa.string()),
    ("page_url", pa.string()),
    ("language", pa.string()),
    ("language_score", pa.float32()),
    ("source", pa.string()),
])


def candidate_table(*, url: Sequence[str], caption: Sequence[str], page_url: Sequence[str],
                    language: Sequence[str], language_score: Sequence[float],
                    source: str) -> pa.Table:
    columns = [url, caption, page_url, language, language_score, [source] * len(url)]
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)],
        schema=SCHEMA,
    )


def shard_name(run_id: str, index: int) -> str:
    return f"{run_id}-{index:05d}.parquet"


class ShardWriter:
    """Appends tables to numbered shards of at most ``rows_per_shard`` rows."""

    def __init__(self, out_dir: Path, run_id: str, rows_per_shard: int,
                 on_shard: Callable[[Path], None] | None = None) -> None:
        self.out_dir = out_dir
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.on_shard = on_shard
        self.shards: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            room = self.rows_per_shard - self._rows
            self._open_writer().write_table(table.slice(0, room))
            self._rows += min(room, table.num_rows)
            table = table.slice(room)
            if self._rows >= self.rows_per_shard:
                self._finish(notify=True)

    def close(self, *, notify: bool = True) -> None:
        """Publish the open shard; ``notify=False`` skips ``on_shard`` (used on error)."""
        if self._writer is not None:
            self._finish(notify=notify)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(notify=exc is None)

    def _path(self, tmp: bool) -> Path:
        name = shard_name(self.run_id, len(self.shards))
        return self.out_dir / (name + ".tmp" if tmp else name)

    def _open_writer(self) -> pq.ParquetWriter:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path(tmp=True), SCHEMA, compression="zstd")
        return self._writer

    def _finish(self, *, notify: bool) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        tmp, final = self._path(tmp=True), self._path(tmp=False)
        if self._rows == 0:
            tmp.unlink()
            return
        os.replace(tmp, final)
        self._rows = 0
        self.shards.append(final)
        if notify and self.on_shard is not None:
            self.on_shard(final)
