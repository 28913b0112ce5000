"""Loading an index folder and searching it: the API the search front end builds on.

::

    from knn.index import open_index

    index = open_index(Path("INDEX"))            # a folder ``pairfarm index`` wrote
    sims, ids = index.search(queries, k=10)       # queries: (nq, d) array, any float dtype
    rows = index.rows(ids[0])                     # metadata of the first query's hits

``search`` normalises the queries (cosine similarity, like the CLIP embeddings the farm
writes) and returns ``(similarities, ids)``: float32 and int64 arrays of shape (nq, k),
best first. Similarities are cosines (``1 - L2^2 / 2`` of the unit vectors the index
holds: exact for Flat, to float16 rounding for HNSW and IVF-SQfp16 (the farm's
embeddings are float16), approximate for SQ8 and PQ). Where the index finds fewer than k
neighbours, ids are -1 and similarities NaN.

Ids are 0-based rows of the index (``knn.store``); ``rows(ids)`` maps them back to the
metadata the farm exported: ``id``, ``shard`` (batch stem), ``key`` (the webdataset key
within the shard's tar), ``url``, ``caption``, ``similarity`` (CLIP image-text score),
``punsafe``, ``pwatermark`` and ``NSFW``, where the shard had them. ``table()`` gives all
rows as one pyarrow table.

The search parameter tuned by ``pairfarm index`` (``info.param`` = ``info.value``) is set
on open; ``search(..., param_value=...)`` overrides it for one call.

Error handling: a folder without ``index.json``, or a faiss file that cannot be read,
raises ``IndexLoadError``; queries of the wrong width raise ``ValueError``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from knn import store
from knn.build import set_search_param, unit32
from knn.errors import IndexLoadError


class KnnIndex:
    """A loaded index folder. Searches may run from several threads."""

    def __init__(self, folder: Path, info: store.IndexInfo, faiss_index: Any) -> None:
        self.folder = folder
        self.info = info
        self._index = faiss_index
        self._lock = threading.Lock()  # the search parameter is index state
        self._table: pa.Table | None = None
        self._starts = np.cumsum([0] + [s.rows for s in info.shards])
        if info.value is not None:
            set_search_param(faiss_index, info.choice, info.value)

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int = 10, *,
               param_value: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 (nq, k), ids int64 (nq, k)) of each query's k nearest."""
        q = np.atleast_2d(np.asarray(queries))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have width {q.shape[1]}, the index {self.dim}")
        with self._lock:
            if param_value is not None:
                set_search_param(self._index, self.info.choice, param_value)
            try:
                dist, ids = self._index.search(unit32(q), k)
            finally:
                if param_value is not None and self.info.value is not None:
                    set_search_param(self._index, self.info.choice, self.info.value)
        sims = np.where(ids >= 0, 1 - dist / 2, np.nan).astype(np.float32)
        return sims, ids.astype(np.int64)

    def table(self) -> pa.Table:
        """Every row's metadata, in id order, with an ``id`` column first."""
        if self._table is None:
            parts = [store.read_rows(self.folder, s.stem) for s in self.info.shards]
            table = pa.concat_tables(parts, promote_options="default") if parts else \
                pa.table({})
            self._table = table.add_column(0, "id", pa.array(np.arange(table.num_rows)))
        return self._table

    def rows(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any] | None]:
        """The metadata rows of ``ids`` (in that order); -1 gives None."""
        table = self.table()
        wanted = [int(i) for i in np.asarray(ids).ravel()]
        bad = [i for i in wanted if i >= table.num_rows or i < -1]
        if bad:
            raise IndexError(f"ids {bad[:5]} are not in this index of {table.num_rows} rows")
        picked = table.take(pa.array([max(i, 0) for i in wanted])).to_pylist()
        return [row if i >= 0 else None for i, row in zip(wanted, picked, strict=True)]


def open_index(folder: Path) -> KnnIndex:
    """Load the index ``pairfarm index`` wrote into ``folder``."""
    import faiss

    info = store.read_info(folder)
    if info is None:
        raise IndexLoadError(f"{folder}: no index.json (build one with pairfarm index)")
    try:
        faiss_index = faiss.read_index(str(folder / info.index_file))
    except RuntimeError as exc:
        raise IndexLoadError(f"cannot read {folder / info.index_file}: {exc}") from exc
    return KnnIndex(folder, info, faiss_index)
