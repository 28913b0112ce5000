"""Near-duplicate collapse of a result list, as clip-retrieval's ``connected_components``
dedup does (``clip_retrieval/clip_back.py``: ``get_non_uniques``, threshold 0.94).

Results whose embeddings have cosine >= ``threshold`` are linked; in each connected
component only the first result (the best ranked) is kept, so a chain a~b~c collapses to
a even when a and c are further apart.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.94


def duplicates(vectors: np.ndarray, threshold: float = THRESHOLD) -> list[int]:
    """Positions (ascending) of the rows of ``vectors`` (unit rows, best ranked first)
    that are near-duplicates of an earlier row of their component."""
    v = np.asarray(vectors, dtype=np.float32)
    if len(v) == 0:
        return []
    linked = (v @ v.T) >= threshold
    component = np.full(len(v), -1)
    for start in range(len(v)):
        if component[start] < 0:
            _flood(linked, component, start)
    return [i for i in range(len(v)) if component[i] != i]


def _flood(linked: np.ndarray, component: np.ndarray, start: int) -> None:
    """Label every row reachable from ``start`` with ``start``."""
    component[start] = start
    stack = [start]
    while stack:
        node = stack.pop()
        for other in np.flatnonzero(linked[node] & (component < 0)):
            component[other] = start
            stack.append(int(other))
