"""An index folder on disk: the faiss file, its rows' metadata, and ``index.json``.

Layout::

    INDEX/index.json            what the index is (``IndexInfo``); written last, replaced
                                atomically: it names the faiss file in use
    INDEX/knn-<ntotal>.index    the faiss index (L2 on unit vectors)
    INDEX/rows/rows_<S>.parquet the metadata of shard S's indexed rows, in index order

Index ids are 0-based row numbers in the concatenation of ``shards`` in their order, so
row ``i`` of shard number j has id ``sum(rows of shards before j) + i``. A new faiss file
is written under a new name and the old one deleted only after ``index.json`` points to
the new one, so an interrupted ``pairfarm index`` leaves the previous index whole and
never adds a shard twice.

Error handling: an unreadable folder raises ``IndexLoadError``, a failed write
``IndexBuildError``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from knn.choose import Choice, Kind
from knn.errors import IndexBuildError, IndexLoadError
from pairfarm.staging import replacing

INFO_NAME = "index.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    stem: str
    rows: int
    dropped: int  # rows of the shard left out by the NSFW filter


@dataclass(frozen=True)
class IndexInfo:
    """The contents of ``index.json``."""

    kind: Kind
    key: str
    m: int
    nlist: int
    out_d: int
    dim: int
    ntotal: int
    trained_n: int  # vectors the index was trained for (IVF) or first built with
    budget: int
    index_file: str
    source: str
    param: str | None = None
    value: int | None = None
    recall_at_10: float | None = None
    recall_target: float = 0.95
    eval_queries: int = 0
    queries_per_s: float | None = None
    keep_untagged: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    version: int = FORMAT_VERSION

    @property
    def choice(self) -> Choice:
        return Choice(self.kind, m=self.m, nlist=self.nlist, out_d=self.out_d)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> IndexInfo:
        data: dict[str, Any] = json.loads(text)
        if data.get("version") != FORMAT_VERSION:
            raise IndexLoadError(f"index format version {data.get('version')}, "
                                 f"this pairfarm reads {FORMAT_VERSION}")
        data["shards"] = [ShardEntry(**s) for s in data.get("shards", [])]
        return cls(**data)


def read_info(folder: Path) -> IndexInfo | None:
    """The folder's ``index.json``, or None when there is no index yet."""
    path = folder / INFO_NAME
    if not path.exists():
        return None
    try:
        return IndexInfo.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise IndexLoadError(f"cannot read {path}: {exc}") from exc


def _replace(path: Path, write: Any) -> None:
    try:
        with replacing(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise IndexBuildError(f"cannot write {path}: {exc}") from exc


def write_rows(folder: Path, stem: str, table: pa.Table) -> None:
    _replace(folder / "rows" / f"rows_{stem}.parquet", lambda tmp: pq.write_table(table, tmp))


def read_rows(folder: Path, stem: str) -> pa.Table:
    try:
        return pq.read_table(folder / "rows" / f"rows_{stem}.parquet")
    except (OSError, ValueError) as exc:
        raise IndexLoadError(f"cannot read the rows of shard {stem} in {folder}: {exc}") \
            from exc


def write_index_file(folder: Path, name: str, index: Any) -> None:
    import faiss

    _replace(folder / name, lambda tmp: faiss.write_index(index, str(tmp)))


def commit(folder: Path, info: IndexInfo, previous: IndexInfo | None) -> None:
    """Point ``index.json`` at ``info``'s faiss file, then delete the one it replaced."""
    _replace(folder / INFO_NAME, lambda tmp: tmp.write_text(info.to_json()))
    if previous is not None and previous.index_file != info.index_file:
        (folder / previous.index_file).unlink(missing_ok=True)
