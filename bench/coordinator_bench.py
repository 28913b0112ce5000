"""Coordinator benchmark: ingest rows/s, lease latency, leases/s through the HTTP API.

    python bench/coordinator_bench.py --rows 1000000 --rows 10000000

For each --rows N, on a fresh database of a fresh embedded PostgreSQL 18 (durable
defaults, shared_buffers 1GB, max_wal_size 8GB):

1. ingest: N synthetic candidates (100k hosts, LAION-like extra columns) written to
   parquet files of 1M rows, loaded with ``coordinator.ingest.run.ingest`` (Arrow read,
   validation, URL hashes into the dedup's current wave, COPY), one call per 10M rows; rows/s of
   each call (with the CPU seconds of the PostgreSQL processes and the load average) and
   over the whole ingest;
2. lease latency with N pending: 10 calls of ``Leases.lease_download`` (10k batch) right
   after the ingest, then VACUUM ANALYZE and CHECKPOINT (what autovacuum and the
   checkpointer do in the minutes after a large ingest) and --leases calls;
3. lease latency at 50 % and at 99 % done: the pending chunks whose id modulo 100 is
   under 50 (then under 99) put into finished batches of at most ~1M candidates,
   VACUUM ANALYZE, then --leases calls again. Leases take whole chunks and put what they
   do not need back as one chunk, so a drained farm holds whole chunks spread over the
   table, as here. The PostgreSQL processes' memory (PSS) after the ingest and at the end.

``--jobs J`` loads J files at once (``pairfarm ingest --jobs``); ``--wave-size N`` sets
the dedup's waves (``pairfarm ingest --wave-size``; the frozen waves' tables are summed as
``url_hashes_w*`` in the sizes); ``--ingest-only`` stops after the ingest's figures;
``--work DIR`` puts the
server's data and the files there (kept), instead of a temporary folder (removed);
``--pg-setting NAME=VALUE`` overrides a server setting.

Then, on a separate database of --api-rows candidates, ``pairfarm coordinator`` runs in a
subprocess and --clients client processes (``pairfarm.client.CoordinatorClient``) lease
and complete 10k batches for --api-seconds, from the moment all of them have started and
registered; sustained leases/s, client-side latency, and the CPU time per lease of the
coordinator process, of PostgreSQL and of the clients (all on the same cores here).

With --lease-during-ingest ROWS (item 4 of issue 16: new files must not stall leases), on
a separate database holding --during-base pending candidates: --during-leases leases
(10k batches, one every --during-interval seconds, from this process's own connection)
without an ingest, then the same lease loop while ``pairfarm ingest`` (a subprocess) loads
ROWS more candidates in --during-files files; lease p50/p99/max without and during the
ingest, the ingest's rows/s, and the load average; with --overflow-rounds R, before the
ingest, R rounds of leases beside another session's open transaction of 1, then of 70
written subtransactions (over PostgreSQL's 64 cached per backend: other sessions'
snapshots become suboverflowed), each lease marked by whether a backend had overflowed.

Prints one line per figure. Needs the [coordinator] extra.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from bench.processes import ServerCpu  # noqa: E402
from coordinator.db import ensure_database, libpq_url  # noqa: E402
from coordinator.embedded_pg import EmbeddedPostgres  # noqa: E402
from coordinator.ingest.run import ingest  # noqa: E402
from coordinator.ingest.validate import Columns  # noqa: E402
from coordinator.ingest.waves import WAVE_SIZE  # noqa: E402
from coordinator.leases import Leases  # noqa: E402
from coordinator.migrate import upgrade  # noqa: E402
from coordinator.settings import make_lease_settings  # noqa: E402
from coordinator.tokens import authenticate, create_token, touch_worker  # noqa: E402

BENCH_SETTINGS = {"shared_buffers": "1GB", "max_wal_size": "8GB",
                  "maintenance_work_mem": "512MB", "work_mem": "64MB",
                  "track_io_timing": "on"}
FILE_ROWS = 1_000_000
#: rows per ingest call (one rate line each), unless --ingest-rows
GROUP_ROWS = 10_000_000
COLD_LEASES = 10
HOSTS = 100_000


def synthetic_file(path: Path, start: int, count: int) -> Path:
    ids = range(start, start + count)
    table = pa.table({
        "url": [f"http://img{i % HOSTS}.example.com/p/{i}.jpg" for i in ids],
        "caption": [f"a photo of item {i} on a table" for i in ids],
        "width": pa.array([640 + i % 7 for i in ids], pa.int32()),
        "similarity": pa.array([(i % 100) / 300 for i in ids], pa.float32()),
    })
    pq.write_table(table, path)
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report_latency(label: str, seconds: list[float], sizes: list[int]) -> None:
    ms = [s * 1000 for s in seconds]
    print(f"{label}: leases={len(ms)} p50={percentile(ms, 50):.1f} ms "
          f"p99={percentile(ms, 99):.1f} ms max={max(ms):.1f} ms "
          f"mean_batch={statistics.mean(sizes):.0f}", flush=True)


class DiskStats:
    """Reads and writes of the block device that holds a folder (``/proc/diskstats``):
    what the disk did while a series of leases ran, beside the server's own reads."""

    def __init__(self, folder: Path) -> None:
        dev = os.stat(folder).st_dev
        self.key = (os.major(dev), os.minor(dev))

    def sample(self) -> tuple[int, int, int, int, int] | None:
        """Reads, ms spent reading, writes, ms spent writing, ms busy; None when the
        device is not listed (e.g. an overlay or a network file system)."""
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if (int(f[0]), int(f[1])) == self.key:
                return int(f[3]), int(f[6]), int(f[7]), int(f[10]), int(f[12])
        return None

    @staticmethod
    def line(before: tuple[int, ...] | None, after: tuple[int, ...] | None,
             seconds: float) -> str:
        if before is None or after is None or seconds <= 0:
            return "disk: not listed in /proc/diskstats"
        reads, read_ms, writes, write_ms, busy = (a - b for a, b in zip(after, before, strict=True))
        return (f"disk: {reads / seconds:,.0f} reads/s ({read_ms / max(reads, 1):.2f} ms "
                f"each), {writes / seconds:,.0f} writes/s ({write_ms / max(writes, 1):.2f} ms "
                f"each), busy {100 * busy / 1000 / seconds:.0f} %")


def backend_reads(conn: sa.Connection) -> tuple[int, float]:
    """Blocks the client backends read from outside shared buffers, and the ms they
    waited for them (``pg_stat_io``; the wait needs ``track_io_timing``)."""
    row = conn.execute(sa.text(
        "SELECT COALESCE(sum(reads), 0), COALESCE(sum(read_time), 0) FROM pg_stat_io "
        "WHERE backend_type = 'client backend'")).one()
    return int(row[0]), float(row[1])


def table_reads(conn: sa.Connection) -> dict[str, int]:
    """Blocks read from outside shared buffers so far, by table (heap, its indexes, its
    TOAST table and index) (``pg_statio_user_tables``)."""
    rows = conn.execute(sa.text(
        "SELECT relname, heap_blks_read, COALESCE(idx_blks_read, 0), "
        "COALESCE(toast_blks_read, 0) + COALESCE(tidx_blks_read, 0) "
        "FROM pg_statio_user_tables")).all()
    reads: dict[str, int] = {}
    for name, heap, idx, toast in rows:
        reads |= {name: int(heap), f"{name} indexes": int(idx),
                  f"{name} TOAST": int(toast)}
    return reads


def lease_latency(url: str, label: str, count: int, work: Path) -> None:
    engine = sa.create_engine(url)
    try:
        _, token = create_token(engine, "worker", f"bench-{label}")
        worker = touch_worker(engine, authenticate(engine, token))
        service = Leases(engine, make_lease_settings(batch_size=10_000))
        lease_fn = service.lease_download_raw
        times, sizes, index_rows = [], [], 0
        disk = DiskStats(work)
        with engine.connect() as conn:
            reads0, tables0 = backend_reads(conn), table_reads(conn)
        disk0, t_start = disk.sample(), time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            lease = lease_fn(worker)
            times.append(time.perf_counter() - t0)
            if lease is None:
                break
            sizes.append(lease.count)
            index_rows += service.last_form.from_index if service.last_form else 0
        disk1, elapsed = disk.sample(), time.perf_counter() - t_start
        with engine.connect() as conn:  # the pool's one connection: the leases' backend
            conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
            conn.commit()
            reads1, tables1 = backend_reads(conn), table_reads(conn)
        report_latency(label, times, sizes)
        n = max(len(times), 1)
        print(f"{label}: server reads {(reads1[0] - reads0[0]) / n:,.0f} blocks a lease, "
              f"waited {(reads1[1] - reads0[1]) / n:,.1f} ms a lease; "
              f"{DiskStats.line(disk0, disk1, elapsed)}", flush=True)
        by_table = sorted(((tables1[k] - tables0.get(k, 0)) / n, k) for k in tables1)
        print(f"{label}: blocks read a lease by table: " + ", ".join(
            f"{name} {blocks:,.0f}" for blocks, name in reversed(by_table) if blocks >= 1),
              flush=True)
        slowest = sorted(range(len(times)), key=times.__getitem__)[-3:]
        print(f"{label}: slowest " + ", ".join(
            f"#{i + 1} {times[i] * 1000:.0f} ms" for i in reversed(slowest)), flush=True)
        print(f"{label}: rows from the index fallback {index_rows} of {sum(sizes)}; "
              f"learned unbatched fraction {service.rate.fraction:.4f}", flush=True)
    finally:
        engine.dispose()


def vacuum(url: str) -> None:
    """What the server does in the minutes after a large ingest: autovacuum (insert
    threshold) sets the hint bits and visibility map of the new pages, and a checkpoint
    writes the ingest's dirty buffers. Before that, each lease's first read of a
    candidates page sets its hint bits (with data checksums, initdb's default since
    PostgreSQL 18, a full-page image in the WAL), and the checkpoint of the ingest's
    ~1.5 GB stalls commits while it syncs."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute("VACUUM ANALYZE candidates, pending_chunks")
        conn.execute("CHECKPOINT")
        print(f"  (VACUUM ANALYZE, CHECKPOINT in {time.perf_counter() - t0:.0f} s)",
              flush=True)


def wal_bytes(url: str) -> int:
    """The server's WAL position, in bytes."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def print_sizes(url: str, rows: int) -> None:
    """Bytes on disk per candidate of each ingest table and index."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        sizes = conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relkind IN ('r', 'i', 't') AND pg_relation_size(c.oid) > 0 "
            "ORDER BY 2 DESC").fetchall()
        toast = conn.execute("SELECT sum(pg_relation_size(reltoastrelid)) FROM pg_class "
                             "WHERE relname IN ('candidates', 'pending_chunks', 'url_waves')"
                             ).fetchone()
    grouped: dict[str, int] = {}
    for relation, size in sizes:  # the dedup's frozen waves as one table and one key
        name = re.sub(r"^url_hashes_w\d+", "url_hashes_w*", relation)
        grouped[name] = grouped.get(name, 0) + size
    parts = ", ".join(f"{name} {size / rows:.1f}" for name, size in
                      sorted(grouped.items(), key=lambda item: -item[1])
                      if size / rows >= 0.1)
    total = sum(size for _, size in sizes) + int((toast or [0])[0] or 0)
    print(f"  bytes per candidate: {parts}; all {total / rows:.1f}", flush=True)


#: chunk ids per statement of the drain (each finished batch holds at most ~1M ids)
DRAIN_CHUNKS = 62_500


def drain_to(url: str, keep_percent: int) -> None:
    """Finish all pending chunks but those whose id modulo 100 is at least 100 -
    ``keep_percent`` (what a farm that far along holds: whole chunks spread over the
    table), into finished batches of at most DRAIN_CHUNKS chunks each, then VACUUM
    ANALYZE."""
    import psycopg

    keep_from = 100 - keep_percent
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        t0 = time.perf_counter()
        top = conn.execute("SELECT COALESCE(max(id), 0) FROM pending_chunks").fetchone()
        assert top is not None
        for lo in range(0, int(top[0]) + 1, DRAIN_CHUNKS):
            with conn.transaction():
                batch = conn.execute("INSERT INTO batches (status, size) VALUES ('done', 0) "
                                     "RETURNING id").fetchone()
                assert batch is not None
                conn.execute(
                    "WITH taken AS (DELETE FROM pending_chunks WHERE id >= %s AND id < %s "
                    "AND id %% 100 < %s RETURNING ids) INSERT INTO batch_members "
                    "(batch_id, ids) SELECT %s, array_agg(u.id) "
                    "FROM taken, unnest(taken.ids) AS u(id) HAVING count(*) > 0",
                    [lo, lo + DRAIN_CHUNKS, keep_from, batch[0]])
        conn.execute("VACUUM ANALYZE pending_chunks")
        print(f"  ({100 - keep_percent} % done set up in {time.perf_counter() - t0:.0f} s)",
              flush=True)


def server_memory(postmaster: int) -> str:
    """The PostgreSQL processes' memory: the sum of their proportional set sizes (shared
    buffers counted once across them) and the largest RSS."""
    pss = rss = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if int(entry.name) != postmaster and ppid != postmaster:
                continue
            rollup = (entry / "smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]
              if line.split()[-1] == "kB"}
        pss += kb.get("Pss", 0)
        rss = max(rss, kb.get("Rss", 0))
    return f"PostgreSQL memory: PSS {pss / 2**20:.2f} GiB in all, largest RSS {rss / 2**20:.2f} GiB"


def bench_rows(server_url: str, work: Path, rows: int, leases: int, cpu: ServerCpu, *,
               group_rows: int = GROUP_ROWS, jobs: int = 1,
               wave_size: int = WAVE_SIZE, ingest_only: bool = False) -> None:
    name = f"bench_{rows}"
    ensure_database(server_url, name)
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    took, inserted = 0.0, 0
    for start in range(0, rows, group_rows):
        files = [synthetic_file(work / f"c{rows}_{s}.parquet", s, min(FILE_ROWS, rows - s))
                 for s in range(start, min(rows, start + group_rows), FILE_ROWS)]
        cpu0, wal0, t0 = cpu.seconds(), wal_bytes(url), time.perf_counter()
        loader0 = time.process_time()
        summaries = ingest(url, files, Columns(), jobs=jobs, wave_size=wave_size)
        group = time.perf_counter() - t0
        loader = time.process_time() - loader0
        took += group
        added = sum(s.inserted for s in summaries)
        inserted += added
        print(f"  ingest rows {start:,}..{start + added:,}: {group:.1f} s, "
              f"{added / group:,.0f} rows/s, PostgreSQL CPU {cpu.seconds() - cpu0:.1f} s, "
              f"loader CPU {loader:.1f} s, "
              f"WAL {(wal_bytes(url) - wal0) / added * 1e6 / 2**20:,.0f} MiB per 1M rows, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        for f in files:
            f.unlink()
    print(f"ingest {rows:,} rows: {took:.1f} s, {inserted / took:,.0f} rows/s "
          f"(inserted {inserted:,})", flush=True)
    print_sizes(url, inserted)
    print(f"  {server_memory(cpu.postmaster)}", flush=True)
    if ingest_only:
        return
    lease_latency(url, f"lease at {rows:,} pending, right after the ingest", COLD_LEASES, work)
    vacuum(url)
    lease_latency(url, f"lease at {rows:,} pending", leases, work)
    for keep in (50, 1):
        drain_to(url, keep)
        lease_latency(url, f"lease at {rows:,} rows, {100 - keep} % done", leases, work)
    print(f"  {server_memory(cpu.postmaster)}", flush=True)


def api_client(base: str, token: str, seconds: float, sync: tuple[Any, Any],
               queue: multiprocessing.Queue) -> None:
    """One client process: imports and registers first, then waits for ``go`` so that
    the measured window holds leases only (not 16 interpreter start-ups)."""
    from pairfarm.client import CoordinatorClient
    from pairfarm.protocol import DownloadReport, ShardFiles

    sha = "0" * 64
    shard = ShardFiles(tar="s3://bench/0.tar", parquet="s3://bench/0.parquet",
                       stats="s3://bench/0_stats.json", tar_sha256=sha, parquet_sha256=sha,
                       tar_bytes=0)
    times, done = [], 0
    with CoordinatorClient(base, token) as client:
        client.register(f"bench-{os.getpid()}")
        ready, go = sync
        ready.release()
        go.wait()
        start = os.times()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            t0 = time.perf_counter()
            lease = client.lease_download()
            times.append(time.perf_counter() - t0)
            if lease is None:
                break
            client.complete("download", lease.batch_id, DownloadReport(
                lease_token=lease.lease_token, shard=shard,
                outcomes={"ok": len(lease.candidates)}, bytes_downloaded=0, duration_s=0))
            done += 1
    usage = os.times()
    queue.put((done, times, usage.user + usage.system - start.user - start.system))


def bench_api(server_url: str, work: Path, rows: int, clients: int, seconds: float) -> None:
    import psycopg

    ensure_database(server_url, "bench_api")
    url = server_url.rsplit("/", 1)[0] + "/bench_api"
    upgrade(url)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("WITH inserted AS (INSERT INTO candidates (url, caption) "
                     "SELECT 'http://img' || (i %% 100000) || '.example.com/' || i || '.jpg', "
                     "'a photo of item ' || i FROM generate_series(1, %s::bigint) i "
                     "RETURNING id) INSERT INTO pending_chunks (ids) SELECT array_agg(id) "
                     "FROM inserted GROUP BY id / 16",
                     [rows])
        conn.execute("INSERT INTO ingests (source, inserted) VALUES ('bench', %s)", [rows])
        conn.execute("VACUUM ANALYZE candidates, pending_chunks")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": url}
    tokens = [subprocess.run([sys.executable, "-m", "pairfarm", "token", "create", "--role",
                              "worker"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip() for _ in range(clients)]
    port = 18600 + os.getpid() % 1000
    log = (work / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pairfarm", "coordinator", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base)
        queue: multiprocessing.Queue = multiprocessing.Queue()
        ready, go = multiprocessing.Semaphore(0), multiprocessing.Event()
        procs = [multiprocessing.Process(target=api_client,
                                         args=(base, t, seconds, (ready, go), queue))
                 for t in tokens]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        cpu_before = cpu_split(proc.pid)
        t0 = time.perf_counter()
        go.set()
        results = [queue.get() for _ in procs]
        took = time.perf_counter() - t0
        cpu_after = cpu_split(proc.pid)
        for p in procs:
            p.join()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    leased = sum(r[0] for r in results)
    times = [t for r in results for t in r[1]]
    print(f"API, {clients} client processes, {rows:,} candidates, {took:.1f} s: "
          f"{leased / took:.1f} leases/s (lease + complete of 10k batches, "
          f"{leased} batches)", flush=True)
    report_latency("API lease call (client side)", times, [10_000])
    used = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
    print("API, CPU s per lease: " + ", ".join(
        f"{k} {1000 * v / max(1, leased):.0f} ms" for k, v in used.items())
        + f"; clients {1000 * sum(r[2] for r in results) / max(1, leased):.0f} ms",
        flush=True)


@dataclass
class LeaseSeries:
    """Each lease's seconds, size, start (seconds since the loop began), and whether
    another backend's subtransactions had overflowed (its 64 cached subxids) just
    before it."""

    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    overflowed: list[bool] = field(default_factory=list)

    def pick(self, keep: Any) -> LeaseSeries:
        idx = [i for i in range(len(self.times)) if keep(i)]
        return LeaseSeries(*([getattr(self, f)[i] for i in idx]
                             for f in ("times", "sizes", "starts", "overflowed")))


def subxacts_overflowed(conn: Any) -> bool:
    """Whether any backend's subtransaction cache has overflowed (PostgreSQL 16+)."""
    row = conn.execute("SELECT coalesce(bool_or(s.subxact_overflowed), false) "
                       "FROM pg_stat_get_backend_idset() b, "
                       "LATERAL pg_stat_get_backend_subxact(b) s").fetchone()
    return bool(row[0])


def lease_loop(service: Leases, worker: int, interval: float, probe: Any, *,
               count: int | None = None, until: Any = None) -> LeaseSeries:
    """Lease one batch every ``interval`` s: ``count`` times, or while ``until()`` is true."""
    out = LeaseSeries()
    begin = time.perf_counter()
    while (count is None or len(out.times) < count) and (until is None or until()):
        overflowed = subxacts_overflowed(probe)
        t0 = time.perf_counter()
        lease = service.lease_download_raw(worker)
        took = time.perf_counter() - t0
        out.times.append(took)
        out.sizes.append(lease.count if lease is not None else 0)
        out.starts.append(t0 - begin)
        out.overflowed.append(overflowed)
        time.sleep(max(0.0, interval - took))
    return out


def with_open_subxacts(url: str, subxacts: int, run: Any) -> LeaseSeries:
    """``run()`` while another session holds a transaction open in which ``subxacts``
    savepoints each wrote a row (what a loading file's chunks do); rolled back after."""
    with psycopg.connect(libpq_url(url)) as conn:
        for i in range(subxacts):
            conn.execute(f"SAVEPOINT s{i}")
            conn.execute("INSERT INTO url_hashes (h) VALUES (gen_random_uuid())")
            conn.execute(f"RELEASE SAVEPOINT s{i}")
        try:
            series: LeaseSeries = run()
            return series
        finally:
            conn.rollback()


def bench_lease_during_ingest(server_url: str, work: Path, rows: int, *, base: int,
                              files: int, leases: int, interval: float,
                              overflow_rounds: int = 0) -> None:
    name = f"bench_during_{rows}"
    ensure_database(server_url, name)
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    seed = [synthetic_file(work / f"base_{s}.parquet", s, min(FILE_ROWS, base - s))
            for s in range(0, base, FILE_ROWS)]
    ingest(url, seed, Columns())
    vacuum(url)
    per_file = -(-rows // files)
    new = [synthetic_file(work / f"during_{s}.parquet", s, min(per_file, base + rows - s))
           for s in range(base, base + rows, per_file)]
    engine = sa.create_engine(url)
    probe = psycopg.connect(libpq_url(url), autocommit=True)
    try:
        _, token = create_token(engine, "worker", "bench-during")
        worker = touch_worker(engine, authenticate(engine, token))
        service = Leases(engine, make_lease_settings(batch_size=10_000))
        load0 = os.getloadavg()[0]
        alone = lease_loop(service, worker, interval, probe, count=leases)
        report_latency(f"lease without ingest ({base:,} pending, load {load0:.1f}-"
                       f"{os.getloadavg()[0]:.1f})", alone.times, alone.sizes)
        for _ in range(overflow_rounds):
            for subxacts in (1, 70):
                series = with_open_subxacts(url, subxacts, lambda: lease_loop(
                    service, worker, interval, probe, count=leases // 2))
                report_latency(f"lease beside an open transaction of {subxacts} written "
                               f"subtransaction(s) (overflowed "
                               f"{sum(series.overflowed)}/{len(series.times)}, load "
                               f"{os.getloadavg()[0]:.1f})", series.times, series.sizes)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pairfarm", "ingest",
                                 "--database-url", url, *map(str, new)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        during = lease_loop(service, worker, interval, probe,
                            until=lambda: proc.poll() is None)
        took = time.perf_counter() - t0
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"pairfarm ingest failed: {err.decode()[-2000:]}")
        print(f"ingest during leases: {rows:,} rows in {files} file(s) of {per_file:,}, "
              f"{took:.1f} s, {rows / took:,.0f} rows/s", flush=True)
        full = during.pick(lambda i: during.sizes[i] > 0)
        load = f"load {load0:.1f}-{os.getloadavg()[0]:.1f}"
        report_latency(f"lease during ingest ({load}; {len(during.times) - len(full.times)} "
                       f"leases found nothing, left out)", full.times, full.sizes)
        for flag, label in ((False, "subxacts not overflowed"), (True, "subxacts overflowed")):
            part = full.pick(lambda i, flag=flag: full.overflowed[i] == flag)
            if part.times:
                report_latency(f"lease during ingest, {label}", part.times, part.sizes)
        slowest = sorted(range(len(full.times)), key=full.times.__getitem__)[-3:]
        print("lease during ingest: slowest " + ", ".join(
            f"{full.times[i] * 1000:.0f} ms at +{full.starts[i]:.0f} s" for i in
            reversed(slowest)), flush=True)
    finally:
        probe.close()
        engine.dispose()
        for f in [*seed, *new]:
            f.unlink(missing_ok=True)


def cpu_split(coordinator_pid: int) -> dict[str, float]:
    """CPU seconds so far of the coordinator process and of all PostgreSQL processes."""
    import psutil

    out = {"coordinator": 0.0, "postgres": 0.0}
    for p in psutil.process_iter(["name", "cpu_times"]):
        times = p.info["cpu_times"]
        if times is None:
            continue
        if p.pid == coordinator_pid:
            out["coordinator"] += times.user + times.system
        elif (p.info["name"] or "").startswith("postgres"):
            out["postgres"] += times.user + times.system
    return out



def _wait(base: str) -> None:
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("coordinator did not start")


def main() -> None:
    logging.basicConfig(format="  %(message)s")  # the ingest's wave freezes, with timings
    logging.getLogger("coordinator.ingest.run").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", default=None)
    parser.add_argument("--leases", type=int, default=50)
    parser.add_argument("--ingest-rows", type=int, default=GROUP_ROWS,
                        help="rows per ingest call: one rate line each")
    parser.add_argument("--jobs", type=int, default=1,
                        help="files the ingest loads at once (pairfarm ingest --jobs)")
    parser.add_argument("--wave-size", type=int, default=WAVE_SIZE,
                        help="hashes a dedup wave holds (pairfarm ingest --wave-size)")
    parser.add_argument("--ingest-only", action="store_true",
                        help="stop after the ingest's figures (no leases)")
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL setting over the benchmark's defaults "
                             "(repeatable), e.g. shared_buffers=6GB")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the server's data and the files (default: a new "
                             "temporary folder)")
    parser.add_argument("--api-rows", type=int, default=5_000_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--api-seconds", type=float, default=20.0)
    parser.add_argument("--skip-api", action="store_true")
    parser.add_argument("--api-only", action="store_true")
    parser.add_argument("--lease-during-ingest", type=int, default=0, metavar="ROWS",
                        help="lease latency while pairfarm ingest loads ROWS (only this)")
    parser.add_argument("--during-base", type=int, default=3_000_000,
                        help="candidates pending before that ingest")
    parser.add_argument("--during-files", type=int, default=1,
                        help="files the ROWS come in")
    parser.add_argument("--during-leases", type=int, default=60,
                        help="leases measured without the ingest")
    parser.add_argument("--during-interval", type=float, default=1.0,
                        help="seconds from one lease's start to the next")
    parser.add_argument("--overflow-rounds", type=int, default=0,
                        help="before the ingest, rounds of --during-leases/2 leases beside an "
                             "open transaction of 1, then 70 written subtransactions")
    args = parser.parse_args()
    work = (Path(tempfile.mkdtemp(prefix="pairfarm-bench-")) if args.work is None
            else args.work.resolve())
    work.mkdir(parents=True, exist_ok=True)
    settings = {**BENCH_SETTINGS, **dict(s.split("=", 1) for s in args.pg_setting)}
    pg = EmbeddedPostgres(work / "data", settings=settings)
    server = pg.start()
    print(f"PostgreSQL in {work}; cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}; "
          + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    try:
        if args.lease_during_ingest:
            bench_lease_during_ingest(
                server.url(), work, args.lease_during_ingest, base=args.during_base,
                files=args.during_files, leases=args.during_leases,
                interval=args.during_interval, overflow_rounds=args.overflow_rounds)
            return
        for rows in [] if args.api_only else args.rows or [1_000_000]:
            bench_rows(server.url(), work, rows, args.leases, ServerCpu(server.pid),
                       group_rows=args.ingest_rows, jobs=args.jobs,
                       wave_size=args.wave_size, ingest_only=args.ingest_only)
        if not args.skip_api:
            bench_api(server.url(), work, args.api_rows, args.clients, args.api_seconds)
    finally:
        pg.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
