"""The lease's page reads from a cold cache: TABLESAMPLE SYSTEM against prefetched blocks.

    python bench/coordinator_bench.py --rows 10000000 --skip-api --ingest-only --work W
    python bench/lease_prefetch.py --work W          # as root: it drops the page cache

A sample scan reads its pages one after the other. This measures what reading the same
number of random ``pending_chunks`` pages costs three ways, each round on a server
restarted after the kernel's page cache was dropped (``/proc/sys/vm/drop_caches``), so
every page comes from the disk:

- ``sample``: ``TABLESAMPLE SYSTEM`` sized to --blocks pages, as the lease's claim does;
- ``tids``: --blocks random block numbers, their tuples read by a TID scan (offsets 1-8);
- ``prefetch``: the same, each block first passed to ``pg_prewarm(..., 'prefetch')``
  (``posix_fadvise`` WILLNEED: the reads overlap).

Prints each call's milliseconds and the p50/p90 of each way. A design probe, not the
lease: nothing here locks or deletes chunks.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLE = ("SELECT count(*) FROM (SELECT ctid, ids FROM pending_chunks "
          "TABLESAMPLE SYSTEM (%s)) s")
BLOCKS = "SELECT array_agg(DISTINCT floor(random() * %s)::int) FROM generate_series(1, %s)"
PREFETCH = ("SELECT count(pg_prewarm('pending_chunks', 'prefetch', 'main', b, b)) "
            "FROM unnest(%s::int[]) b")
TIDS = ("SELECT count(*) FROM (SELECT p.ctid, p.ids FROM pending_chunks p WHERE p.ctid = ANY("
        "ARRAY(SELECT format('(%%s,%%s)', b, o)::tid FROM unnest(%s::int[]) b, "
        "generate_series(1, 8) o))) s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="coordinator_bench's --work folder (its data/ is used)")
    parser.add_argument("--database", default="bench_10000000")
    parser.add_argument("--blocks", type=int, default=250, help="pages read a call")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=5, help="calls a round and way")
    args = parser.parse_args()

    from coordinator.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(args.work / "data")
    times: dict[str, list[float]] = {"sample": [], "tids": [], "prefetch": []}
    for rnd in range(args.rounds):
        for way, found in times.items():
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            server = pg.start()
            try:
                url = server.url(args.database).replace("+psycopg", "")
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
                    row = conn.execute("SELECT relpages FROM pg_class "
                                       "WHERE oid = 'pending_chunks'::regclass").fetchone()
                    assert row is not None
                    pages = int(row[0])
                    for _ in range(args.calls):
                        found.append(_call(conn, way, pages, args.blocks))
                        print(rnd, way, f"{found[-1]:.1f} ms", flush=True)
            finally:
                pg.stop(mode="fast")
    for way, found in times.items():
        found.sort()
        print(f"{way}: p50 {statistics.median(found):.1f} ms, "
              f"p90 {found[int(len(found) * 0.9)]:.1f} ms, {len(found)} calls")


def _call(conn: psycopg.Connection[Any], way: str, pages: int, blocks: int) -> float:
    t0 = time.perf_counter()
    if way == "sample":
        conn.execute(SAMPLE, [blocks / pages * 100]).fetchone()
    else:
        row = conn.execute(BLOCKS, [pages, blocks]).fetchone()
        assert row is not None
        chosen = row[0]
        if way == "prefetch":
            conn.execute(PREFETCH, [chosen]).fetchone()
        conn.execute(TIDS, [chosen]).fetchone()
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    main()
