"""The whole ingest with one file at a time against several at once (``--jobs``).

    python bench/ingest_jobs.py --rows 10000000 --step 2000000 --files-per-step 4

On a fresh embedded PostgreSQL 18 with the coordinator benchmark's settings
(shared_buffers 1GB, max_wal_size 8GB), the synthetic candidates of
``bench/coordinator_bench.py`` in steps of --step rows, each step --files-per-step
parquet files loaded by one ``coordinator.ingest.run.ingest`` call; the steps alternate
between ``jobs=1`` and ``jobs=--jobs`` (the first with 1), so both see about the same
table sizes and the same machine. Per step: wall seconds and rows/s, and per 1M rows the
CPU seconds of this process (the loader: reading, validating, hashing, encoding, COPY)
and of the PostgreSQL server (from /proc), their sum, and the cores they kept busy
(CPU / wall). On a loaded machine rows/s measures the machine; the CPU per row and the
cores used say what the same work would do on idle cores.
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

from bench.coordinator_bench import BENCH_SETTINGS, synthetic_file  # noqa: E402
from bench.processes import ServerCpu  # noqa: E402
from coordinator.db import ensure_database  # noqa: E402
from coordinator.embedded_pg import EmbeddedPostgres  # noqa: E402
from coordinator.ingest.run import ingest  # noqa: E402
from coordinator.ingest.validate import Columns  # noqa: E402
from coordinator.migrate import upgrade  # noqa: E402


def step_files(work: Path, start: int, rows: int, count: int) -> list[Path]:
    size = rows // count
    return [synthetic_file(work / f"s{start + i * size}.parquet", start + i * size, size)
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--step", type=int, default=2_000_000)
    parser.add_argument("--files-per-step", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pairfarm-jobs-"))
    pg = EmbeddedPostgres(work / "data", settings=BENCH_SETTINGS)
    server = pg.start()
    cpu = ServerCpu(server.pid)
    print(f"{args.rows:,} rows in steps of {args.step:,} ({args.files_per_step} files); "
          f"jobs 1 and {args.jobs} alternated; cpus={os.cpu_count()}", flush=True)
    try:
        ensure_database(server.url(), "jobs")
        url = server.url().rsplit("/", 1)[0] + "/jobs"
        upgrade(url)
        for k, start in enumerate(range(0, args.rows, args.step)):
            files = step_files(work, start, args.step, args.files_per_step)
            jobs = 1 if k % 2 == 0 else args.jobs
            load0 = os.getloadavg()[0]
            server0, own0, t0 = cpu.seconds(), time.process_time(), time.perf_counter()
            summaries = ingest(url, files, Columns(), jobs=jobs)
            wall = time.perf_counter() - t0
            own, srv = time.process_time() - own0, cpu.seconds() - server0
            rows = sum(s.inserted for s in summaries)
            per = 1e6 / rows
            print(f"{start / 1e6:5.1f}M-{(start + rows) / 1e6:.1f}M jobs {jobs}: "
                  f"{wall:6.1f} s, {rows / wall:>9,.0f} rows/s; per 1M rows: loader CPU "
                  f"{own * per:5.2f} s, PostgreSQL CPU {srv * per:5.2f} s, sum "
                  f"{(own + srv) * per:5.2f} s; cores busy {(own + srv) / wall:4.2f}; "
                  f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
            for f in files:
                f.unlink()
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
