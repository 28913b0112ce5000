"""Queries/s of the two indexes ``bench/knn_bench.py`` left in ``--work``, timed in turns
in one process (so that both see the same machine load), at given search parameters.

    .venv/bin/python bench/knn_requery.py --work bench/out/knn \\
        --pairfarm-ef 779 869 --autofaiss-ef 814 1023 [--rounds 3]

pairfarm's index through ``knn.index.open_index``; autofaiss's ``af/knn.index`` with
faiss directly (inner product). Each figure: recall@10 on the saved queries against the
saved gold standard, and the best queries/s over ``--rounds`` rounds, the two indexes
alternating within each round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from knn.exact import recall_at
from knn.index import open_index


def main() -> None:
    import faiss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--pairfarm-ef", type=int, nargs="+", required=True)
    p.add_argument("--autofaiss-ef", type=int, nargs="+", required=True)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    q = np.load(a.work / "queries.npy").astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gold = np.load(a.work / "gold.npy")
    pf = open_index(a.work / "pf-index")
    af = faiss.read_index(str(a.work / "af" / "knn.index"))
    space = faiss.ParameterSpace()

    def run_pf(ef: int) -> np.ndarray:
        return pf.search(q, 10, param_value=ef)[1]

    def run_af(ef: int) -> np.ndarray:
        space.set_index_parameter(af, "efSearch", ef)
        return af.search(q, 10)[1]

    cases = [("pairfarm", ef, run_pf) for ef in a.pairfarm_ef] + \
        [("autofaiss", ef, run_af) for ef in a.autofaiss_ef]
    best = {(name, ef): 0.0 for name, ef, _ in cases}
    recall = {}
    for _ in range(a.rounds):
        for name, ef, run in cases:
            t = time.perf_counter()
            ids = run(ef)
            best[name, ef] = max(best[name, ef], len(q) / (time.perf_counter() - t))
            recall[name, ef] = recall_at(ids, gold, 10)
    for (name, ef), qps in best.items():
        print(f"{name:9s} efSearch {ef:5d}  recall@10 {recall[name, ef]:.4f}  "
              f"{qps:,.1f} queries/s")


if __name__ == "__main__":
    main()
