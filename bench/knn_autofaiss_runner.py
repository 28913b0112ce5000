"""autofaiss's side of ``bench/knn_bench.py``; runs in autofaiss's own virtual environment
(e.g. ``.venv-af`` beside the checkout: ``python3 -m venv .venv-af && .venv-af/bin/pip
install autofaiss faiss-cpu 'pyarrow<16'``; autofaiss 2.18 needs numpy < 2).

    .venv-af/bin/python bench/knn_autofaiss_runner.py --embeddings DIR/embeddings/img_emb \\
        --work DIR/af --memory 2.5G --queries q.npy --gold gold.npy [--recall 0.95]

Builds with ``autofaiss.build_index`` as a user would (inner product, the memory budget,
its default 10 ms query-time target for its own tuning), then measures on the benchmark's
queries: recall@10 and queries/s at the parameters autofaiss chose, and at the smallest
``efSearch`` / ``nprobe`` whose recall@10 reaches ``--recall`` (the same recall as
pairfarm's). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import faiss
import numpy as np
from autofaiss import build_index


def recall(found: np.ndarray, gold: np.ndarray) -> float:
    hits = sum(len(set(f[:10]) & set(g[:10])) for f, g in zip(found, gold, strict=True))
    return hits / (10 * len(gold))


def timed(index: faiss.Index, q: np.ndarray) -> tuple[np.ndarray, float]:
    """ids of a k=10 search, and the best queries/s of repeats over at least 1 s."""
    best, spent, ids = 0.0, 0.0, None
    while spent < 1.0:
        t = time.perf_counter()
        _, ids = index.search(q, 10)
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, len(q) / dt)
    return ids, best


def param_name(key: str) -> tuple[str, int, int] | None:
    if key.startswith("HNSW"):
        return "efSearch", 10, 4096
    m = re.search(r"IVF(\d+)", key)
    return ("nprobe", 1, int(m.group(1))) if m else None


def same_recall(index: faiss.Index, key: str, q: np.ndarray, gold: np.ndarray,
                target: float) -> dict:
    found = param_name(key)
    if found is None:
        return {}
    name, lo, hi = found
    space = faiss.ParameterSpace()

    def at(v: int) -> float:
        space.set_index_parameter(index, name, v)
        if "_HNSW" in key:
            space.set_index_parameter(index, "quantizer_efSearch", max(2 * v, 16))
        return recall(index.search(q, 10)[1], gold)

    if at(hi) < target:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid) >= target else (mid + 1, hi)
    r = at(hi)
    ids, qps = timed(index, q)
    return {"param_same": f"{name}={hi}", "recall_same": recall(ids, gold), "qps_same": qps,
            "recall_check": r}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--embeddings", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--memory", required=True)
    p.add_argument("--current-memory", default="12G")
    p.add_argument("--queries", required=True)
    p.add_argument("--gold", required=True)
    p.add_argument("--recall", type=float, default=0.95)
    a = p.parse_args()
    q = np.load(a.queries).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gold = np.load(a.gold)
    t = time.perf_counter()
    index, infos = build_index(embeddings=a.embeddings, index_path=f"{a.work}/knn.index",
                               index_infos_path=f"{a.work}/infos.json",
                               max_index_memory_usage=a.memory,
                               current_memory_available=a.current_memory, metric_type="ip")
    build_s = time.perf_counter() - t
    key = infos["index_key"]
    ids, qps = timed(index, q)
    out = {"key": key, "param_auto": infos.get("index_param"), "recall_auto": recall(ids, gold),
           "qps_auto": qps, "build_s": build_s, "size_bytes": infos.get("size in bytes")}
    out.update(same_recall(index, key, q, gold, a.recall))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
