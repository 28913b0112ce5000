"""Benchmark of ``pairfarm index`` against autofaiss at the same memory budget.

    .venv/bin/python bench/knn_bench.py [--n 1000000] [--dim 512] [--memory 2.5G]
        [--queries 1000] [--work bench/out/knn]
        [--autofaiss-python .venv-af/bin/python]

1. writes ``--n`` rows of the clustered synthetic generator (``bench/knn_synth.py``) in
   post-processing's embeddings layout, shards of 100,000 rows, float16;
2. draws ``--queries`` fresh rows of the same distribution (not in the database) and
   computes their exact top 10 by cosine (``knn.exact``, float32): the gold standard;
3. pairfarm: ``knn.build.build_index`` with ``--memory`` (type chosen, search parameter
   tuned to recall@10 >= 0.95 on its own held-out rows), then recall@10 and queries/s on
   the benchmark's queries through ``knn.index.open_index(...).search``;
4. autofaiss: ``bench/knn_autofaiss_runner.py`` in autofaiss's virtual environment on the
   same files and budget: recall@10 and queries/s at its own parameters;
5. both at the same recall: the smallest ``efSearch`` / ``nprobe`` whose recall@10 on the
   benchmark's queries reaches 0.95, and the queries/s there.

Queries/s: a batch of all queries, k = 10, every core, the best of repeats over >= 1 s.
Prints each figure, then the ratios (pairfarm / autofaiss).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import knn_synth  # noqa: E402
from knn.build import BuildSettings, build_index, param_range  # noqa: E402
from knn.choose import parse_memory  # noqa: E402
from knn.exact import exact_knn, recall_at  # noqa: E402
from knn.index import KnnIndex, open_index  # noqa: E402

SHARD_ROWS = 100_000


def timed(index: KnnIndex, q: np.ndarray, value: int | None = None) -> tuple[np.ndarray, float]:
    best, spent, ids = 0.0, 0.0, np.empty(0)
    while spent < 1.0:
        t = time.perf_counter()
        _, ids = index.search(q, 10, param_value=value)
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, len(q) / dt)
    return ids, best


def prepare(args: argparse.Namespace, structure: knn_synth.Structure) -> tuple[Path, Path]:
    src = args.work / "farm"
    if not (src / "embeddings" / "img_emb").is_dir():
        t = time.perf_counter()
        knn_synth.write_layout(src, args.n, args.dim, SHARD_ROWS, structure)
        print(f"generated {args.n:,} x {args.dim} in {time.perf_counter() - t:.1f} s")
    q = knn_synth.vectors(args.queries, args.dim, 1, structure)
    np.save(args.work / "queries.npy", q)
    t = time.perf_counter()
    emb = sorted((src / "embeddings" / "img_emb").glob("*.npy"))
    gold = exact_knn(q, (np.load(p) for p in emb), 10).ids
    np.save(args.work / "gold.npy", gold)
    print(f"exact top 10 of {len(q):,} queries in {time.perf_counter() - t:.1f} s")
    return src, args.work / "queries.npy"


def pairfarm(args: argparse.Namespace, src: Path, q: np.ndarray, gold: np.ndarray) -> dict:
    t = time.perf_counter()
    report = build_index(src, args.work / "pf-index",
                         BuildSettings(budget=parse_memory(args.memory), rebuild=True))
    build_s = time.perf_counter() - t
    index = open_index(args.work / "pf-index")
    ids, qps = timed(index, q)
    info = report.info
    out = {"key": info.key, "param": f"{info.param}={info.value}", "build_s": build_s,
           "recall_own": info.recall_at_10, "recall": recall_at(ids, gold, 10), "qps": qps,
           "size_bytes": info.choice.size_bytes(info.ntotal, info.dim)}
    return out | same_recall(index, q, gold, 0.95)


def same_recall(index: KnnIndex, q: np.ndarray, gold: np.ndarray, target: float) -> dict:
    """The smallest search parameter whose recall@10 on the benchmark queries reaches
    ``target``, and the queries/s there (the figure compared with autofaiss's)."""
    if index.info.param is None:
        return {}
    lo, hi = param_range(index.info.choice)
    at = lambda v: recall_at(index.search(q, 10, param_value=v)[1], gold, 10)  # noqa: E731
    if at(hi) < target:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid) >= target else (mid + 1, hi)
    ids, qps = timed(index, q, hi)
    return {"param_same": f"{index.info.param}={hi}", "recall_same": recall_at(ids, gold, 10),
            "qps_same": qps}


def autofaiss(args: argparse.Namespace, src: Path, recall: float) -> dict:
    (args.work / "af").mkdir(exist_ok=True)
    out = subprocess.run(
        [str(args.autofaiss_python), str(REPO / "bench" / "knn_autofaiss_runner.py"),
         "--embeddings", str(src / "embeddings" / "img_emb"), "--work", str(args.work / "af"),
         "--memory", args.memory, "--queries", str(args.work / "queries.npy"),
         "--gold", str(args.work / "gold.npy"), "--recall", str(recall)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--memory", default="2.5G")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--work", type=Path, default=Path("bench/out/knn"))
    p.add_argument("--autofaiss-python", type=Path, default=Path(".venv-af/bin/python"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, n={args.n:,} d={args.dim} "
          f"memory={args.memory} queries={args.queries}")
    src, qpath = prepare(args, knn_synth.Structure.make(args.dim))
    q, gold = np.load(qpath), np.load(args.work / "gold.npy")
    pf = pairfarm(args, src, q, gold)
    print("pairfarm  ", json.dumps(pf))
    af = autofaiss(args, src, 0.95)
    print("autofaiss ", json.dumps(af))
    print(f"queries/s pairfarm {pf['qps']:,.0f} at recall@10 {pf['recall']:.4f} ({pf['key']}, "
          f"{pf['param']}); autofaiss {af['qps_auto']:,.0f} at {af['recall_auto']:.4f} "
          f"({af['key']}, {af['param_auto']}) -> ratio {pf['qps'] / af['qps_auto']:.2f}")
    if "qps_same" in af and "qps_same" in pf:
        print(f"same recall (smallest parameter reaching 0.95 on these queries): pairfarm "
              f"{pf['qps_same']:,.0f} at {pf['recall_same']:.4f} ({pf['param_same']}); "
              f"autofaiss {af['qps_same']:,.0f} at {af['recall_same']:.4f} "
              f"({af['param_same']}) -> ratio {pf['qps_same'] / af['qps_same']:.2f}")
    print(f"build s: pairfarm {pf['build_s']:.0f}, autofaiss {af['build_s']:.0f}")


if __name__ == "__main__":
    main()
