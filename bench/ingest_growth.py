"""Which part of the ingest's server CPU per row grows with the table.

    python bench/ingest_growth.py --rows 10000000 --step 2000000 \
        --variant full --variant no-hashes --variant hashes --variant sb4g

The synthetic candidates of ``bench/coordinator_bench.py`` (100k hosts, two extra
columns) are prepared once, as the loader prepares them (``ChunkPreparer``: sorted
hash COPY data, candidate CSV with ids, pending_chunks rows), and kept on disk chunk by
chunk. Each variant then gets a fresh embedded PostgreSQL 18 (the coordinator
benchmark's settings: shared_buffers 1GB, max_wal_size 8GB, plus the variant's own) and
loads the same data in --step rows a transaction (one savepoint per chunk for the
hashes, as the loader does), and prints per step and per 1M rows:

- the CPU seconds of the loading backend (from /proc/PID/stat), of the other server
  processes by kind (checkpointer, walwriter, io workers, autovacuum...), and of exited
  children (autovacuum workers, counted in the postmaster's cutime);
- WAL bytes, and the client backend's ``pg_stat_io`` reads, writes and evictions.

Variants (the server's side of ``FileLoader.write`` for chunks without duplicates):

- ``full``: hashes into ``url_hashes`` (savepoint), candidates, pending_chunks;
- ``no-hashes``: candidates and pending_chunks only (no dedup);
- ``hashes``: the hashes only;
- ``candidates``: the candidates ``COPY`` only;
- ``partN``: ``full`` with ``url_hashes`` range-partitioned N ways on the hash's leading
  bits (N a power of 2 <= 256);
- ``sbXg``: ``full`` with shared_buffers X GB;
- ``hashes-run``: the hashes only, all of a step's in one sorted ``COPY`` (a sorted run
  of --step hashes instead of one per 131,072-row chunk);
- ``runK``: ``full`` with K chunks at a time: their hashes merged into one sorted
  ``COPY`` (a run of K x 131,072), then their candidates and pending_chunks;
- ``bigint``: ``full`` with the dedup key as a bigint (the hash's first 8 bytes) instead
  of uuid (a narrower key: more entries a leaf);
- ``parallelK``: ``full`` with the step's chunks split over K connections, each its own
  transaction, loaded at once (several files on several backends).

Prints one line per step. CPU seconds are the usable figure on a loaded machine; wall
seconds are printed for the record.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.coordinator_bench import BENCH_SETTINGS, synthetic_file  # noqa: E402
from coordinator.db import ensure_database, libpq_url  # noqa: E402
from coordinator.embedded_pg import EmbeddedPostgres  # noqa: E402
from coordinator.ingest.loader import ChunkPreparer, run_of  # noqa: E402
from coordinator.ingest.reader import detect, read_batches  # noqa: E402
from coordinator.ingest.validate import Columns, validate  # noqa: E402
from coordinator.migrate import upgrade  # noqa: E402
from coordinator.queries import Q  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
Chunk = tuple[bytes, bytes, bytes]  # hash COPY binary, candidates CSV, pending_chunks
IO_SQL = ("SELECT coalesce(sum(reads), 0), coalesce(sum(writes), 0), "
          "coalesce(sum(evictions), 0), coalesce(sum(extends), 0) FROM pg_stat_io "
          "WHERE backend_type = 'client backend'")


# -- the data, prepared once ---------------------------------------------------------

def prepare(work: Path, rows: int, step: int) -> list[Path]:
    """One folder per step, one file triple per chunk; ids from 1."""
    counter = {"next": 1}

    def reserve(n: int) -> int:
        first = counter["next"]
        counter["next"] += n
        return first

    folders = []
    for k, start in enumerate(range(0, rows, step)):
        folder = work / f"step{k}"
        folders.append(folder)
        if (folder / "done").exists():
            counter["next"] = int((folder / "done").read_text())
            continue
        folder.mkdir(parents=True, exist_ok=True)
        parquet = synthetic_file(work / "step.parquet", start, min(step, rows - start))
        source = detect(parquet, None)
        preparer = ChunkPreparer(source.name, 1, reserve)
        row = 1
        for i, batch in enumerate(read_batches(source, Columns().text_columns())):
            chunk = preparer.prepare(validate(batch, Columns(), row), batch.num_rows)
            row += batch.num_rows
            (folder / f"{i:05d}.h").write_bytes(run_of([chunk]).hash_copy)
            (folder / f"{i:05d}.csv").write_bytes(bytes(chunk.csv))
            (folder / f"{i:05d}.pc").write_bytes(chunk.chunks)
        parquet.unlink()
        (folder / "done").write_text(str(counter["next"]))
        print(f"prepared step {k} ({row - 1:,} rows)", flush=True)
    return folders


def chunks_of(folder: Path) -> list[Chunk]:
    return [((folder / f"{p.stem}.h").read_bytes(), p.read_bytes(),
             (folder / f"{p.stem}.pc").read_bytes())
            for p in sorted(folder.glob("*.csv"))]


# -- what the server does per chunk ----------------------------------------------------

def copy(conn: psycopg.Connection, statement: str, data: bytes) -> None:
    with conn.cursor() as cur, cur.copy(statement) as c:
        c.write(data)


def put_hashes(conn: psycopg.Connection, chunk: Chunk) -> None:
    with conn.transaction():
        copy(conn, Q.sql("ingest_copy_hashes"), chunk[0])


def put_candidates(conn: psycopg.Connection, chunk: Chunk) -> None:
    copy(conn, Q.sql("ingest_copy_candidates"), chunk[1])


def put_pending(conn: psycopg.Connection, chunk: Chunk) -> None:
    copy(conn, Q.sql("ingest_copy_chunks"), chunk[2])


def put_all(conn: psycopg.Connection, chunk: Chunk) -> None:
    put_hashes(conn, chunk)
    put_candidates(conn, chunk)
    put_pending(conn, chunk)


def put_no_hashes(conn: psycopg.Connection, chunk: Chunk) -> None:
    put_candidates(conn, chunk)
    put_pending(conn, chunk)


def put_hash_run(conn: psycopg.Connection, chunks: list[Chunk]) -> None:
    """All the chunks' hashes in one sorted COPY."""
    rows = [c[0][19 + i:19 + i + 22] for c in chunks for i in range(0, len(c[0]) - 21, 22)]
    rows.sort()
    with conn.transaction():
        copy(conn, Q.sql("ingest_copy_hashes"), chunks[0][0][:19] + b"".join(rows) + b"\xff\xff")


def put_runs(k: int, conn: psycopg.Connection, chunks: list[Chunk]) -> None:
    """``k`` chunks at a time: one sorted COPY of their hashes, then their rows."""
    for i in range(0, len(chunks), k):
        group = chunks[i:i + k]
        put_hash_run(conn, group)
        for chunk in group:
            put_no_hashes(conn, chunk)


def put_bigint(conn: psycopg.Connection, chunk: Chunk) -> None:
    with conn.transaction():
        copy(conn, "COPY url_hashes (h) FROM STDIN (FORMAT binary)", _as_bigint(chunk[0]))
    put_candidates(conn, chunk)
    put_pending(conn, chunk)


def _as_bigint(hash_copy: bytes) -> bytes:
    """The uuid COPY binary rows (2 + 4 + 16 bytes) as bigint rows (2 + 4 + 8)."""
    head, body = hash_copy[:19], hash_copy[19:-2]
    out = bytearray(head)
    for i in range(0, len(body), 22):
        out += b"\x00\x01\x00\x00\x00\x08" + body[i + 6:i + 14]
    return bytes(out + b"\xff\xff")


def partitioned_ddl(n: int) -> tuple[str, ...]:
    bits = n.bit_length() - 1
    bounds = ["MINVALUE"] + [
        "'" + f"{(i << (128 - bits)):032x}" + "'" for i in range(1, n)] + ["MAXVALUE"]
    ddl = ["DROP TABLE url_hashes",
           "CREATE TABLE url_hashes (h uuid PRIMARY KEY) PARTITION BY RANGE (h)"]
    for i in range(n):
        ddl.append(f"CREATE TABLE url_hashes_{i} PARTITION OF url_hashes "
                   f"FOR VALUES FROM ({_uuid(bounds[i])}) TO ({_uuid(bounds[i + 1])})")
    return tuple(ddl)


def _uuid(bound: str) -> str:
    return bound if bound.endswith("VALUE") else bound + "::uuid"


BIGINT_DDL = ("DROP TABLE url_hashes", "CREATE TABLE url_hashes (h bigint PRIMARY KEY)")


def variant(name: str) -> tuple[dict[str, str], tuple[str, ...], Callable[..., None], int]:
    """(server settings, DDL, per-chunk step, connections) of a variant; 0 connections:
    one, and the step takes all of a step's chunks at once."""
    simple: dict[str, tuple[Callable[..., None], int]] = {
        "full": (put_all, 1), "no-hashes": (put_no_hashes, 1), "hashes": (put_hashes, 1),
        "candidates": (put_candidates, 1), "hashes-run": (put_hash_run, 0)}
    if name in simple:
        return {}, (), *simple[name]
    if m := re.fullmatch(r"part(\d+)", name):
        return {}, partitioned_ddl(int(m[1])), put_all, 1
    if m := re.fullmatch(r"sb(\d+)g", name):
        return {"shared_buffers": f"{m[1]}GB"}, (), put_all, 1
    if m := re.fullmatch(r"run(\d+)", name):
        return {}, (), partial(put_runs, int(m[1])), 0
    if name == "bigint":
        return {}, BIGINT_DDL, put_bigint, 1
    if m := re.fullmatch(r"parallel(\d+)", name):
        return {}, (), put_all, int(m[1])
    raise SystemExit(f"unknown variant {name}")


# -- CPU of the server's processes -------------------------------------------------------

def _stat(pid: int) -> list[str]:
    return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())


def server_cpu(postmaster: int, backends: set[int]) -> Counter[str]:
    """CPU clock ticks so far by kind: the loading backends, each other child by its
    title, and 'exited' (children that exited, from the postmaster's cutime)."""
    out: Counter[str] = Counter()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = _stat(pid)
            if pid == postmaster:
                out["exited"] += int(fields[13]) + int(fields[14])
                out["postmaster"] += int(fields[11]) + int(fields[12])
                continue
            if int(fields[1]) != postmaster:
                continue
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, IndexError):
            continue
        kind = "backend" if pid in backends else _kind(title)
        out[kind] += int(fields[11]) + int(fields[12])
    return out


def _kind(title: str) -> str:
    words = title.removeprefix("postgres: ").split()
    if words and words[0] in ("io", "autovacuum", "background", "logical", "walsummarizer"):
        return " ".join(words[:2])
    return words[0] if words else title


# -- one variant -------------------------------------------------------------------------

def run_variant(name: str, folders: list[Path], work: Path, step: int,
                perf: bool = False) -> None:
    settings, ddl, put, connections = variant(name)
    datadir = work / f"pg-{name}"
    shutil.rmtree(datadir, ignore_errors=True)
    pg = EmbeddedPostgres(datadir, settings=BENCH_SETTINGS | settings)
    server = pg.start()
    try:
        ensure_database(server.url(), "growth")
        url = libpq_url(server.url().rsplit("/", 1)[0] + "/growth")
        upgrade(server.url().rsplit("/", 1)[0] + "/growth")
        conns = [psycopg.connect(url, autocommit=True) for _ in range(max(1, connections))]
        try:
            for ddl_line in ddl:
                conns[0].execute(ddl_line)
            for conn in conns:
                conn.execute(Q.sql("ingest_session"))
            pids = {int(c.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
                    for c in conns}
            print(f"== {name}: settings {settings or 'bench'}, {connections} connection(s), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            for k, folder in enumerate(folders):
                recorder = _perf_start(pids, work / f"perf-{name}-{k}.data") if perf else None
                _step(conns, put, chunks_of(folder), postmaster=server.pid, pids=pids,
                      k=k, step=step)
                if recorder is not None:
                    _perf_report(recorder, work / f"perf-{name}-{k}.data")
        finally:
            for conn in conns:
                conn.close()
    finally:
        pg.stop()
        shutil.rmtree(datadir, ignore_errors=True)


def _step(conns: list[psycopg.Connection], put: Callable[..., None], chunks: list[Chunk],
          *, postmaster: int, pids: set[int], k: int, step: int) -> None:
    admin = conns[0]
    wal0 = _one(admin, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    io0 = admin.execute(IO_SQL).fetchone()
    cpu0 = server_cpu(postmaster, pids)
    t0 = time.perf_counter()
    shares = [chunks[i::len(conns)] for i in range(len(conns))]
    if put is put_hash_run or isinstance(put, partial):
        with conns[0].transaction():
            put(conns[0], chunks)
    elif len(conns) == 1:
        _load(conns[0], put, shares[0])
    else:
        threads = [threading.Thread(target=_load, args=(c, put, s))
                   for c, s in zip(conns, shares, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    ticks = server_cpu(postmaster, pids)
    ticks.subtract(cpu0)
    cpu = {kind: n / TICK for kind, n in ticks.items()}
    wal = _one(admin, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn") - wal0
    io1 = admin.execute(IO_SQL).fetchone()
    assert io0 is not None and io1 is not None
    reads, writes, evictions, extends = (int(b) - int(a) for a, b in zip(io0, io1, strict=True))
    per = 1_000_000 / step
    others = ", ".join(f"{kind} {s * per:.2f}" for kind, s in sorted(cpu.items())
                       if kind != "backend" and s >= 0.05)
    print(f"{k * step / 1e6:4.1f}M-{(k + 1) * step / 1e6:.1f}M: wall {wall:6.2f} s; "
          f"per 1M rows: backend CPU {cpu.get('backend', 0.0) * per:5.2f} s, server CPU "
          f"{sum(cpu.values()) * per:5.2f} s ({others}); WAL {wal * per / 2**20:.0f} MiB; "
          f"backend io reads {reads * per:.0f} writes {writes * per:.0f} "
          f"evictions {evictions * per:.0f} extends {extends * per:.0f}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)


def _perf_start(pids: set[int], out: Path) -> subprocess.Popen[bytes]:
    """``perf record`` of the loading backends (sampled, with call graphs)."""
    recorder = subprocess.Popen(
        ["perf", "record", "-q", "-F", "499", "-g", "-o", str(out),
         "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL)
    time.sleep(1)
    return recorder


def _perf_report(recorder: subprocess.Popen[bytes], data: Path) -> None:
    """Stop the recorder; print the backend's 15 hottest functions (self time)."""
    recorder.send_signal(2)
    recorder.wait(timeout=60)
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
         "--sort", "sym", "--percent-limit", "1.5"],
        capture_output=True, text=True, check=False).stdout
    lines = [line for line in report.splitlines() if line.strip() and "%" in line
             and not line.startswith("#")]
    print("   perf: " + "; ".join(" ".join(line.split()) for line in lines[:15]),
          flush=True)


def _load(conn: psycopg.Connection, put: Callable[..., None], chunks: list[Chunk]) -> None:
    with conn.transaction():
        for chunk in chunks:
            put(conn, chunk)


def _one(conn: psycopg.Connection, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--step", type=int, default=2_000_000)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--perf", action="store_true",
                        help="perf record the loading backends, print the hottest functions")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the prepared data here (reused by later runs)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pairfarm-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{args.rows:,} rows in steps of {args.step:,}; cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f}", flush=True)
    folders = prepare(work, args.rows, args.step)
    for name in args.variant or ["full"]:
        run_variant(name, folders, work, args.step, args.perf)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
