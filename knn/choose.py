"""Which faiss index to build for n vectors of width d under a memory budget.

The rules are autofaiss's (``autofaiss/external/optimize.py``,
``get_optimal_index_keys_v2``, ``get_optimal_nb_clusters``, ``get_optimal_quantization``;
sizes as ``autofaiss/external/metadata.py`` estimates them), in this order:

1. fewer than ``FLAT_BELOW`` vectors: ``Flat`` (exact; nothing to tune);
2. the largest HNSW that fits, ``M`` at least 8 and at most 32;
3. ``IVF{nlist},SQfp16`` when the vectors, 8-byte ids and centroids fit;
4. ``IVF{nlist},SQ8`` (one byte per dimension), where autofaiss goes straight to product
   quantization: at 4x less than float16 it still reaches recall@10 0.95, which PQ often
   cannot;
5. ``OPQ{m}_{y},IVF{nlist}[_HNSW32],PQ{m}x8`` with the largest m that fits, as autofaiss;
6. else ``IndexBuildError``: the budget is too small for any index of n vectors.

``nlist`` is autofaiss's first recommendation: ``2**round(log2(4 sqrt n))`` below 1M
vectors, 16384 below 10M, 65536 below 300M, 2**17 above (at most n / 39, faiss's
minimum of training points per list).

Differences from autofaiss, on purpose:

- HNSW and IVF hold the vectors in float16 (``HNSW{M}_SQfp16``, ``IVF{nlist},SQfp16``)
  where autofaiss holds float32: the farm's embeddings are float16 already
  (``gpu_postprocess.outputs``), so float32 adds nothing but bytes. Measured on 30,000
  synthetic 512-d rows (``bench/knn_synth.py``): identical recall@10 at the same
  efSearch (0.9434 at 64, 0.9582 at 96), 1.6-2.0x the queries/s, 1.7x faster to build.
  The HNSW rule is autofaiss's ``M = floor((budget / (4 n) - d) / 2)`` with 2 bytes a
  dimension and the 8-byte id of the ``IDMap`` around it:
  ``M = floor((budget / n - 8 - 2 d) / 8)``.
- The metric is L2 on unit vectors: the same ranking as cosine and inner product
  (``|a - b|^2 = 2 - 2 a.b``), ``similarity = 1 - d^2 / 2``, one metric for every type.
- The search parameter (``efSearch``, ``nprobe``) is tuned for a recall target against
  the exact neighbours of held-out queries (``knn.build``), not for a query time
  (autofaiss's 10 ms default picked efSearch 2,173 on 20,000 rows: recall 0.999 at 69
  queries/s, where 0.95 needed efSearch 69).

Growing an index (``rebuild_reason``): vectors are added to an HNSW or IVF index without
rebuilding. A rebuild is needed when the index in use would no longer fit the budget at
the new size, when a ``Flat`` index grows past ``FLAT_BELOW``, or when an IVF index holds
more than ``RETRAIN_GROWTH`` times the vectors its centroids were trained for (its lists
get that much longer, and the right ``nlist`` has grown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from knn.errors import IndexBuildError

FLAT_BELOW = 1000
HNSW_MIN_M, HNSW_MAX_M = 8, 32
PQ_VALUES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
ID_BYTES = 8  # faiss inverted lists store an int64 id per vector
IVF_HNSW_FROM = 1000  # autofaiss: an HNSW coarse quantizer from 1000 centroids on
RETRAIN_GROWTH = 8
Kind = Literal["Flat", "HNSW", "IVFfp16", "IVFSQ8", "OPQ"]
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class Choice:
    """An index type and its shape; ``key`` is its faiss ``index_factory`` string."""

    kind: Kind
    m: int = 0  # HNSW links, or PQ sub-quantizers
    nlist: int = 0
    out_d: int = 0  # OPQ output width

    @property
    def key(self) -> str:
        if self.kind == "HNSW":
            return f"HNSW{self.m}_SQfp16"
        if self.kind == "IVFfp16":
            return f"IVF{self.nlist},SQfp16"
        if self.kind == "IVFSQ8":
            return f"IVF{self.nlist},SQ8"
        if self.kind == "OPQ":
            coarse = f"IVF{self.nlist}_HNSW32" if self.nlist >= IVF_HNSW_FROM else \
                f"IVF{self.nlist}"
            return f"OPQ{self.m}_{self.out_d},{coarse},PQ{self.m}x8"
        return "Flat"

    @property
    def factory(self) -> str:
        """The ``index_factory`` string built: HNSW and Flat inside an ``IDMap`` (ids are
        given on add, so held-out rows can be added last under their own ids)."""
        return f"IDMap,{self.key}" if self.kind in ("HNSW", "Flat") else self.key

    @property
    def param(self) -> str | None:
        """The search parameter tuned for recall (None: exact)."""
        return {"HNSW": "efSearch", "Flat": None}.get(self.kind, "nprobe")

    @property
    def needs_training(self) -> bool:
        return self.kind in ("IVFfp16", "IVFSQ8", "OPQ")

    def size_bytes(self, n: int, d: int) -> int:
        """Estimated memory of the index holding n vectors of width d."""
        centroids = self.nlist * d * 4
        if self.kind == "HNSW":
            return n * (d * 2 + self.m * 2 * 4 + ID_BYTES)
        if self.kind == "IVFfp16":
            return n * (d * 2 + ID_BYTES) + centroids
        if self.kind == "IVFSQ8":
            return n * (d + ID_BYTES) + centroids
        if self.kind == "OPQ":
            hnsw = self.nlist * 32 * 2 * 4 if self.nlist >= IVF_HNSW_FROM else 0
            return n * (self.m + ID_BYTES) + centroids + hnsw + self.m * self.out_d * 4
        return n * (d * 4 + ID_BYTES)


def parse_memory(text: str) -> int:
    """``"16G"``, ``"512M"``, ``"1.5G"``, ``"1000000"`` -> bytes (powers of 1024)."""
    value = text.strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1] in UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise IndexBuildError(f"not a memory size: {text!r} (e.g. 512M, 4G)") from None
    if number <= 0:
        raise IndexBuildError(f"memory size must be positive: {text!r}")
    return int(number * UNITS[unit])


def nb_clusters(n: int) -> int:
    """autofaiss's first recommended IVF list count for n vectors."""
    if n < 1_000_000:
        return max(1, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))
    if n < 10_000_000:
        return 16_384
    return 65_536 if n < 300_000_000 else 2**17


def _hnsw_m(n: int, d: int, budget: int) -> int:
    """The most links a float16 HNSW of n vectors can have in ``budget`` bytes."""
    return math.floor((budget / n - ID_BYTES - 2 * d) / 8)


def _opq(n: int, d: int, budget: int, nlist: int) -> Choice | None:
    for pq in PQ_VALUES:
        if pq < d:
            choice = Choice("OPQ", m=pq, nlist=nlist, out_d=(min(d // pq, 6) + 1) * pq)
            if choice.size_bytes(n, d) <= budget:
                return choice
    return None


def choose_index(n: int, d: int, budget: int) -> Choice:
    """The index for n vectors of width d in at most ``budget`` bytes (rules above)."""
    if n < FLAT_BELOW and Choice("Flat").size_bytes(n, d) <= budget:
        return Choice("Flat")
    m = _hnsw_m(n, d, budget)
    if m >= HNSW_MIN_M:
        return Choice("HNSW", m=min(m, HNSW_MAX_M))
    nlist = min(nb_clusters(n), max(1, n // 39))  # faiss wants >= 39 training points a list
    ivf_kinds: tuple[Kind, ...] = ("IVFfp16", "IVFSQ8")
    for kind in ivf_kinds:
        choice = Choice(kind, nlist=nlist)
        if choice.size_bytes(n, d) <= budget:
            return choice
    choice_pq = _opq(n, d, budget, nlist)
    if choice_pq is None:
        smallest = Choice("OPQ", m=4, nlist=nlist, out_d=28).size_bytes(n, d)
        raise IndexBuildError(f"a memory budget of {budget:,} bytes is too small for "
                              f"{n:,} vectors of width {d}: the smallest index "
                              f"({PQ_VALUES[-1]} bytes a vector) needs {smallest:,}")
    return choice_pq


def rebuild_reason(current: Choice, trained_n: int, new_n: int, d: int,
                   budget: int) -> str | None:
    """Why an index holding ``current`` cannot just grow to ``new_n`` vectors (None: it can)."""
    if current.size_bytes(new_n, d) > budget:
        return (f"{current.key} with {new_n:,} vectors needs "
                f"{current.size_bytes(new_n, d):,} bytes, over the {budget:,} byte budget")
    if current.kind == "Flat" and new_n >= FLAT_BELOW:
        return f"Flat is for fewer than {FLAT_BELOW} vectors; {new_n:,} now"
    if current.needs_training and new_n > RETRAIN_GROWTH * trained_n:
        return (f"{current.key} was trained for {trained_n:,} vectors; {new_n:,} is more "
                f"than {RETRAIN_GROWTH}x that")
    return None
