"""float32 against float16 vectors in the same HNSW: the measurement behind
``knn/choose.py``'s choice of ``HNSW{M}_SQfp16``.

    .venv/bin/python bench/knn_fp16.py [--n 30000] [--queries 500] [--dim 512]

Rows of the clustered synthetic generator (``bench/knn_synth.py``) rounded to float16, as
the farm writes them; fresh queries and their exact top 10. Builds ``HNSW32`` (float32
vectors, what autofaiss builds) and ``HNSW32_SQfp16`` (float16) with the L2 metric and
prints, for efSearch 64 and 96, the build time, recall@10 and queries/s (best of 5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import knn_synth
from knn.exact import exact_knn, recall_at


def main() -> None:
    import faiss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--dim", type=int, default=512)
    a = p.parse_args()
    st = knn_synth.Structure.make(a.dim)
    x = knn_synth.vectors(a.n, a.dim, 0, st).astype(np.float16).astype(np.float32)
    q = knn_synth.vectors(a.queries, a.dim, 1, st)
    gold = exact_knn(q, [x], 10).ids
    for key in ("HNSW32", "HNSW32_SQfp16"):
        index = faiss.index_factory(a.dim, key, faiss.METRIC_L2)
        if not index.is_trained:
            index.train(x[:1000])
        t = time.perf_counter()
        index.add(x)
        build = time.perf_counter() - t
        for ef in (64, 96):
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
            best, ids = 0.0, np.empty(0)
            for _ in range(5):
                t = time.perf_counter()
                _, ids = index.search(q, 10)
                best = max(best, len(q) / (time.perf_counter() - t))
            print(f"{key:14s} build {build:5.1f} s  efSearch {ef:3d}  recall@10 "
                  f"{recall_at(ids, gold, 10):.4f}  {best:,.0f} queries/s")


if __name__ == "__main__":
    main()
