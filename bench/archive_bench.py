"""Archive benchmark: candidates/s moved from the hot tables into parquet files.

    python bench/archive_bench.py --rows 1000000 --file-candidates 1000000

On a fresh database of a fresh embedded PostgreSQL 18 (durable defaults, shared_buffers
1GB, max_wal_size 8GB): --rows LAION-like candidates (~100-byte URLs, ~60-byte captions,
two extra columns as JSON), all in finished batches of --batch-size (every tenth failed,
the others done with outcomes, a shard and a post-processing report), VACUUM ANALYZE and
CHECKPOINT; then one ``coordinator.archive.archive`` run into a local folder, timed, with
--file-candidates candidates a file. Prints candidates/s, the files' bytes per candidate,
and checks that the hot tables are empty and the files hold every candidate once.

Needs the [coordinator] extra.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from coordinator.archive import archive  # noqa: E402
from coordinator.db import ensure_database, libpq_url  # noqa: E402
from coordinator.embedded_pg import EmbeddedPostgres  # noqa: E402
from coordinator.migrate import upgrade  # noqa: E402
from coordinator.settings import make_archive_settings  # noqa: E402

BENCH_SETTINGS = {"shared_buffers": "1GB", "max_wal_size": "8GB",
                  "maintenance_work_mem": "512MB", "work_mem": "64MB"}


def fill(url: str, rows: int, batch_size: int) -> None:
    """``rows`` candidates in finished batches of ``batch_size``."""
    batches = -(-rows // batch_size)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO candidates (url, caption, language, ingest_id, extra) "
            "SELECT 'https://cdn' || (i %% 100000) || '.example-images.com/uploads/2021/'"
            " || md5(i::text) || '/photo-of-item-' || i || '.jpg',"
            " 'a photo of item ' || i || ' on a wooden table, daylight, high quality',"
            " 'en', 1, json_build_object('width', 640 + i %% 512, 'similarity', 0.31)"
            " FROM generate_series(1, %(n)s::bigint) AS i", {"n": rows})
        conn.execute("INSERT INTO ingests (source, rows_read, inserted, finished_at) "
                     "VALUES ('bench', %(n)s, %(n)s, now())", {"n": rows})
        conn.execute(
            "INSERT INTO batches (id, status, size, attempts, pp_attempts, outcomes, shard,"
            " bytes_downloaded, kept, dropped, downloaded_at, done_at, postprocess,"
            " created_at, updated_at)"
            " SELECT g, CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'done' END, %(s)s, 1, 1,"
            " jsonb_build_object('ok', %(s)s * 7 / 10, 'timeout', %(s)s - %(s)s * 7 / 10),"
            " jsonb_build_object('tar', 's3://shards/' || g || '.tar'), 10000000, 3000,"
            " 4000, now() - interval '2 hours', now() - interval '2 hours',"
            " jsonb_build_object('similarity_edges', '[0, 0.5, 1]'::jsonb,"
            "   'similarity_counts', jsonb_build_array(g, 2 * g)),"
            " now() - interval '3 hours', now() - interval '2 hours'"
            " FROM generate_series(1, %(b)s) AS g", {"s": batch_size, "b": batches})
        conn.execute(
            "INSERT INTO batch_members (batch_id, ids) SELECT g, ARRAY(SELECT"
            " generate_series((g - 1) * %(s)s + 1, LEAST(g * %(s)s, %(n)s))::bigint)"
            " FROM generate_series(1, %(b)s) AS g",
            {"s": batch_size, "b": batches, "n": rows})
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def table_bytes(url: str) -> int:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SELECT pg_total_relation_size('candidates')").fetchone()
        return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--file-candidates", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pairfarm-archive-bench-"))
    pg = EmbeddedPostgres(work / "data", settings=BENCH_SETTINGS)
    server = pg.start()
    print(f"PostgreSQL in {work}; cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}",
          flush=True)
    try:
        ensure_database(server.url(), "bench")
        url = server.url("bench")
        upgrade(url)
        start = time.perf_counter()
        fill(url, args.rows, args.batch_size)
        print(f"filled {args.rows:,} candidates in {time.perf_counter() - start:.1f} s; "
              f"candidates table {table_bytes(url) / 1e6:.0f} MB", flush=True)
        folder = work / "archive"
        settings = make_archive_settings(location=str(folder),
                                         file_candidates=args.file_candidates, min_age_s=0)
        start = time.perf_counter()
        run = archive(url, settings)
        took = time.perf_counter() - start
        files = sorted(folder.glob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        assert rows == run.candidates == args.rows, (rows, run.candidates)
        assert run.hot_after == 0
        print(f"archived {run.candidates:,} candidates ({run.batches} batches) into "
              f"{len(files)} files in {took:.1f} s: {run.candidates / took:,.0f} candidates/s;"
              f" {size / 1e6:.0f} MB of parquet, {size / rows:.0f} bytes a candidate",
              flush=True)
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
