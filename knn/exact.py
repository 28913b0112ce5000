"""Exact k nearest neighbours by cosine similarity, streamed over the database in chunks.

The gold standard of the export and the recall of an index both come from here. Vectors
are L2-normalised in the working precision (float32 or float64) before the dot products,
as the LAION2B/SISAP gold standards were ("computed using normalized vectors"); a chunk's
similarities are merged into the running top k, so the database never has to fit in
memory at once. Ties are broken by the smaller id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

QUERY_BLOCK = 1024  # queries per matrix product: bounds memory to QUERY_BLOCK x chunk


@dataclass(frozen=True)
class Neighbours:
    """Per query, the k most similar database rows, most similar first (0-based ids)."""

    ids: npt.NDArray[np.int64]  # (nq, k)
    similarities: np.ndarray  # (nq, k), in the working dtype


def normalise(x: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """``x`` in ``dtype``, each row divided by its L2 norm (zero rows stay zero)."""
    y = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return y / np.where(norms == 0, 1, norms)


def _top(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row: by similarity descending, then id ascending."""
    if sims.shape[1] > k:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims, ids = np.take_along_axis(sims, part, 1), np.take_along_axis(ids, part, 1)
    order = np.lexsort((ids, -sims), axis=1)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def exact_knn(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, *,
              dtype: npt.DTypeLike = np.float32,
              exclude: np.ndarray | None = None) -> Neighbours:
    """The k nearest database rows of each query by cosine; ``chunks`` are the database's
    consecutive row blocks (ids count across them); rows whose ids are in ``exclude`` are
    left out. Fewer than k rows in all: k shrinks."""
    q = normalise(queries, dtype)
    skip = np.empty(0, dtype=np.int64) if exclude is None else np.asarray(exclude)
    best_s = np.empty((len(q), 0), dtype=dtype)
    best_i = np.empty((len(q), 0), dtype=np.int64)
    start = 0
    for chunk in chunks:
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        keep = ~np.isin(ids, skip)
        x, ids = normalise(chunk[keep], dtype), ids[keep]
        start += len(chunk)
        blocks = [_merge(q[b:b + QUERY_BLOCK], x, ids,
                         (best_s[b:b + QUERY_BLOCK], best_i[b:b + QUERY_BLOCK]), k)
                  for b in range(0, len(q), QUERY_BLOCK)]
        best_s = np.concatenate([s for s, _ in blocks]) if blocks else best_s
        best_i = np.concatenate([i for _, i in blocks]) if blocks else best_i
    return Neighbours(best_i, best_s)


def _merge(q: np.ndarray, x: np.ndarray, ids: np.ndarray,
           best: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One query block's running top k (similarities, ids) merged with one database chunk."""
    best_s, best_i = best
    tiled = np.broadcast_to(ids, (len(q), len(ids)))
    return _top(np.concatenate([best_s, q @ x.T], axis=1),
                np.concatenate([best_i, tiled], axis=1), k)


def recall_at(found: np.ndarray, gold: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] & gold[:k]| / k (ids of any consistent base)."""
    hits = sum(len(set(f[:k].tolist()) & set(g[:k].tolist())) for f, g in zip(found, gold,
                                                                                  strict=True))
    return hits / (len(gold) * k)
