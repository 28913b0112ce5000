"""What a 10k lease costs when the chunks carry their payload, and when they do not.

    python bench/lease_floor.py --rows 2000000 --leases 60

On a fresh embedded PostgreSQL 18 (the coordinator benchmark's settings), --rows
synthetic candidates of ``bench/coordinator_bench.py`` are ingested into database
``frag`` (``pending_chunks`` of 16 ids with their JSON fragments, as ``pairfarm
ingest`` writes them) and VACUUM ANALYZEd. Database ``bare`` is a copy of it whose chunks
carry no fragments (set to NULL, then ``VACUUM FULL``: the dense 43-rows-a-page layout
of the chunks before migration 0009). Then, alternating one lease of each kind, --leases
leases of --batch candidates through ``Leases.lease_download_raw``, each database on its
own connection:

- **fragments**: the claim's ``DELETE ... RETURNING`` hands over the fragments and the
  lease joins them; no ``candidates`` row is read;
- **no fragments**: the same claim, then the batch's 10k candidates read from
  ``candidates`` by primary key and aggregated into JSON (``candidate_fragments``), what
  every lease did before the fragments;
- **re-lease read**: ``batch_candidates`` (what a re-leased batch reads) run again on
  the fragments lease's batch, read only.

Per kind: client-side p50/p99 per lease and the CPU of the backend that served it (from
/proc, summed over the leases, per lease), the tables' bytes per candidate, and a check
that the last lease of both kinds equals the candidates' rows (every field of every
element).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import psycopg
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.coordinator_bench import (  # noqa: E402
    BENCH_SETTINGS,
    FILE_ROWS,
    percentile,
    synthetic_file,
)
from coordinator.db import ensure_database, libpq_url  # noqa: E402
from coordinator.embedded_pg import EmbeddedPostgres  # noqa: E402
from coordinator.ingest.run import ingest  # noqa: E402
from coordinator.ingest.validate import Columns  # noqa: E402
from coordinator.leases import Leases  # noqa: E402
from coordinator.migrate import upgrade  # noqa: E402
from coordinator.queries import Q  # noqa: E402
from coordinator.settings import make_lease_settings  # noqa: E402
from coordinator.tokens import authenticate, create_token, touch_worker  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def backend_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Kind:
    """Latencies and backend CPU ticks of one kind of lease."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.seconds: list[float] = []
        self.ticks = 0
        self.sizes: list[int] = []

    def report(self) -> None:
        ms = [s * 1000 for s in self.seconds]
        print(f"{self.label:44s} leases {len(ms):3d}  p50 {percentile(ms, 50):6.1f} ms  "
              f"p99 {percentile(ms, 99):6.1f} ms  backend CPU "
              f"{self.ticks / TICK / len(ms) * 1000:6.1f} ms a lease  "
              f"(min batch {min(self.sizes)})", flush=True)


def timed(kind: Kind, pid: int, call: Callable[[], T]) -> T:
    ticks0, t0 = backend_ticks(pid), time.perf_counter()
    result = call()
    kind.seconds.append(time.perf_counter() - t0)
    kind.ticks += backend_ticks(pid) - ticks0
    return result


def load(url: str, work: Path, rows: int) -> None:
    for start in range(0, rows, FILE_ROWS):
        path = synthetic_file(work / "c.parquet", start, min(FILE_ROWS, rows - start))
        ingest(url, [path], Columns())
        path.unlink()


def prepare(server_url: str, work: Path, rows: int) -> tuple[str, str]:
    """The two databases' URLs: fragments, no fragments."""
    ensure_database(server_url, "frag")
    frag = server_url.rsplit("/", 1)[0] + "/frag"
    upgrade(frag)
    load(frag, work, rows)
    with psycopg.connect(libpq_url(frag), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE candidates, pending_chunks")
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute("CREATE DATABASE bare TEMPLATE frag")
    bare = server_url.rsplit("/", 1)[0] + "/bare"
    with psycopg.connect(libpq_url(bare), autocommit=True) as conn:
        conn.execute("UPDATE pending_chunks SET url_j = NULL, caption_j = NULL, "
                     "language_j = NULL, extra_j = NULL")
        conn.execute("VACUUM FULL ANALYZE pending_chunks")
        conn.execute("CHECKPOINT")
    for name, url in (("fragments", frag), ("no fragments", bare)):
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            size = conn.execute("SELECT pg_total_relation_size('pending_chunks')").fetchone()
            assert size is not None
            print(f"  {name}: pending_chunks {size[0] / rows:.1f} bytes per candidate "
                  "(heap, key, TOAST)", flush=True)
    return frag, bare


def check(engine: sa.Engine, body: str) -> None:
    """Every element of a lease body equals its candidate's row."""
    data = json.loads(body)
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.text(
            "SELECT id, url, caption, language, extra::text FROM candidates "
            "WHERE id = ANY(:ids)"), {"ids": data["id"]})}
    assert len(rows) == len(data["id"]) == len(data["url"]) == len(data["attempt"])
    for i, cid in enumerate(data["id"]):
        row = rows[cid]
        assert (data["url"][i], data["caption"][i], data["language"][i]) == (
            row.url, row.caption, row.language), cid
        assert data["extra"][i] == (json.loads(row.extra) if row.extra else {}), cid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--leases", type=int, default=60)
    parser.add_argument("--batch", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pairfarm-lease-floor-"))
    pg = EmbeddedPostgres(work / "data", settings=BENCH_SETTINGS)
    server = pg.start()
    try:
        frag, bare = prepare(server.url(), work, args.rows)
        engines = [sa.create_engine(u, pool_size=1, max_overflow=0) for u in (frag, bare)]
        try:
            run(engines[0], engines[1], args)
        finally:
            for engine in engines:
                engine.dispose()
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def _service(engine: sa.Engine, batch: int) -> tuple[Leases, int, int]:
    _, token = create_token(engine, "worker", "lease-floor")
    worker = touch_worker(engine, authenticate(engine, token))
    with engine.connect() as conn:
        pid = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    return Leases(engine, make_lease_settings(batch_size=batch)), worker, pid


def run(frag: sa.Engine, bare: sa.Engine, args: argparse.Namespace) -> None:
    (sf, wf, pf), (sb, wb, pb) = _service(frag, args.batch), _service(bare, args.batch)
    with_f, without, reread = (Kind("fragments: lease_download_raw"),
                               Kind("no fragments: lease_download_raw"),
                               Kind("re-lease read: batch_candidates (read only)"))
    last: dict[str, tuple[sa.Engine, str]] = {}
    for _ in range(args.leases):
        for kind, service, worker, pid, engine in ((with_f, sf, wf, pf, frag),
                                                   (without, sb, wb, pb, bare)):
            lease = timed(kind, pid, partial(service.lease_download_raw, worker))
            assert lease is not None
            kind.sizes.append(lease.count)
            last[kind.label] = (engine, lease.candidates)
            if kind is with_f:
                def read(batch_id: int = lease.info.batch_id) -> int:
                    with frag.connect() as conn:
                        return int(conn.execute(Q.batch_candidates,
                                                {"batch_id": batch_id}).one().n)
                reread.sizes.append(timed(reread, pf, read))
    for kind in (with_f, without, reread):
        kind.report()
    for label, (engine, body) in last.items():
        check(engine, body)
        print(f"{label}: the last lease's {len(json.loads(body)['id'])} candidates equal "
              "their rows", flush=True)


if __name__ == "__main__":
    main()
