"""Answering a query vector from the index: neighbours, safe mode, near-duplicate collapse.

``SearchEngine.search(vector, query)`` asks the index (``knn.index``) for
``query.k * OVERFETCH`` neighbours, drops the unsafe ones in safe mode (``punsafe`` at or
above the threshold, or no score at all), collapses near-duplicates (``search.dedup``, on
the exact embeddings the index was built from, read back from its source folder by
``SourceVectors``), and returns the first ``k``: each with its id, url, caption, cosine
similarity to the query, punsafe and pwatermark.

Error handling: an index whose source embeddings are gone or disagree with its rows
raises ``SearchDataError``; a bad ``k`` or threshold ``QueryError``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knn.errors import KnnError
from knn.index import KnnIndex
from knn.source import ShardPart, read_shard
from search.dedup import THRESHOLD, duplicates
from search.errors import QueryError, SearchDataError

OVERFETCH = 4  # neighbours asked per result wanted, for safe mode and dedup to drop
MAX_K = 1000
DEFAULT_PUNSAFE = 0.5


@dataclass(frozen=True, kw_only=True)
class Query:
    k: int = 20
    safe: bool = True
    punsafe_threshold: float = DEFAULT_PUNSAFE
    dedup: bool = True
    dedup_threshold: float = THRESHOLD

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise QueryError(f"k must be within 1..{MAX_K}, not {self.k}")
        if not 0.0 <= self.punsafe_threshold <= 1.0:
            raise QueryError(f"punsafe threshold must be within [0, 1], not "
                             f"{self.punsafe_threshold}")


@dataclass(frozen=True)
class Hit:
    id: int
    url: str | None
    caption: str | None
    similarity: float  # cosine to the query
    punsafe: float | None
    pwatermark: float | None
    shard: str
    key: str


@dataclass
class Results:
    hits: list[Hit]
    candidates: int  # neighbours the index returned
    unsafe_removed: int = 0
    duplicates_removed: int = 0


class SourceVectors:
    """The exact embeddings of index ids, from the folder the index was built from
    (``read_shard`` with the index's NSFW filter gives each shard's rows in index order)."""

    def __init__(self, index: KnnIndex, source: Path) -> None:
        self._index, self._source = index, source
        self._stems = [s.stem for s in index.info.shards]
        self._starts = np.cumsum([0] + [s.rows for s in index.info.shards])
        self._shard = functools.lru_cache(maxsize=16)(self._read)

    def _read(self, stem: str) -> ShardPart:
        try:
            return read_shard(self._source, stem, keep_untagged=self._index.info.keep_untagged)
        except KnnError as exc:
            raise SearchDataError(f"the index's source {self._source}: {exc}") from exc

    def vectors(self, hits: list[Hit]) -> np.ndarray:
        """Unit float32 rows, one per hit."""
        out = np.zeros((len(hits), self._index.dim), dtype=np.float32)
        for j, hit in enumerate(hits):
            shard_no = int(np.searchsorted(self._starts, hit.id, side="right") - 1)
            part = self._shard(self._stems[shard_no])
            row = hit.id - int(self._starts[shard_no])
            if row >= len(part.vectors) or str(part.metadata["key"][row]) != hit.key:
                raise SearchDataError(f"{self._source} no longer matches the index at id "
                                      f"{hit.id} (shard {hit.shard}): rebuild the index")
            out[j] = part.vectors[row]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class SearchEngine:
    def __init__(self, index: KnnIndex, source: Path) -> None:
        self.index = index
        self.source = SourceVectors(index, source)

    @property
    def dim(self) -> int:
        return self.index.dim

    def search(self, vector: np.ndarray, query: Query) -> Results:
        want = min(self.index.ntotal, query.k * OVERFETCH)
        if want == 0:
            return Results(hits=[], candidates=0)
        sims, ids = self.index.search(np.asarray(vector, dtype=np.float32)[None], want)
        hits = [_hit(row, float(s)) for row, s in
                zip(self.index.rows(ids[0]), sims[0], strict=True) if row is not None]
        results = Results(hits=hits, candidates=len(hits))
        if query.safe:
            self._safe(results, query.punsafe_threshold)
        if query.dedup:
            self._dedup(results, query.dedup_threshold)
        results.hits = results.hits[:query.k]
        return results

    @staticmethod
    def _safe(results: Results, threshold: float) -> None:
        kept = [h for h in results.hits if h.punsafe is not None and h.punsafe < threshold]
        results.unsafe_removed = len(results.hits) - len(kept)
        results.hits = kept

    def _dedup(self, results: Results, threshold: float) -> None:
        dup = set(duplicates(self.source.vectors(results.hits), threshold))
        results.duplicates_removed = len(dup)
        results.hits = [h for i, h in enumerate(results.hits) if i not in dup]


def _hit(row: dict[str, Any], similarity: float) -> Hit:
    return Hit(id=int(row["id"]), url=row.get("url"), caption=row.get("caption"),
               similarity=similarity, punsafe=_number(row.get("punsafe")),
               pwatermark=_number(row.get("pwatermark")), shard=str(row["shard"]),
               key=str(row["key"]))


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)
