"""What a 10k lease costs with today's layout against chunks that carry their payload.

    python bench/lease_floor.py --rows 2000000 --leases 60

On a fresh embedded PostgreSQL 18 (the coordinator benchmark's settings), --rows
synthetic candidates of ``bench/coordinator_bench.py`` are ingested (``pending_chunks``
of 16 ids), VACUUM ANALYZEd; then a second pending table is built from the same chunks,
``pending_payload``: each chunk's ids plus its candidates' fields pre-serialized as
JSON array fragments (``id_j`` ``1,2,...``, ``url_j`` ``"http://...","http://..."``,
``caption_j``, ``language_j``, ``extra_j``), what an ingest could write beside the
candidates. Then, alternating one lease of each kind, --leases leases of --batch
candidates:

- **today**: ``Leases.lease_download_raw`` (batch row, ``claim_sampled`` on
  ``pending_chunks``, ``batch_candidates``: 10k candidates read by ``candidates_pkey``
  and aggregated into the columnar JSON), and ``batch_candidates`` alone, run again on
  the leased batch (read only);
- **payload**: one transaction: the batch row, then one statement that samples
  ``pending_payload`` (TABLESAMPLE SYSTEM, shuffled, ``FOR UPDATE SKIP LOCKED``, the same
  shape as ``claim_sampled``), deletes the chunks ``RETURNING`` their fragments, stores
  the ids in ``batch_members`` and concatenates the fragments into the same columnar
  JSON (``attempt`` all 1). No ``candidates`` row is read.

Per kind: client-side p50/p99 per lease and the CPU of the backend that served it (from
/proc, summed over the leases, per lease), and the tables' bytes per candidate. One
payload lease's JSON is checked against ``candidates`` (every field of every element).
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
PAYLOAD_TABLE = """
CREATE TABLE pending_payload (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ids bigint[] NOT NULL,
    id_j text NOT NULL, url_j text NOT NULL, caption_j text NOT NULL,
    language_j text NOT NULL, extra_j text NOT NULL)
"""
BUILD_PAYLOAD = """
INSERT INTO pending_payload (ids, id_j, url_j, caption_j, language_j, extra_j)
SELECT p.ids,
       string_agg(c.id::text, ',' ORDER BY c.id),
       string_agg(to_json(c.url)::text, ',' ORDER BY c.id),
       string_agg(to_json(c.caption)::text, ',' ORDER BY c.id),
       string_agg(COALESCE(to_json(c.language)::text, 'null'), ',' ORDER BY c.id),
       string_agg(COALESCE(c.extra::text, '{}'), ',' ORDER BY c.id)
  FROM pending_chunks p
 CROSS JOIN LATERAL unnest(p.ids) AS u(id)
  JOIN candidates c ON c.id = u.id
 GROUP BY p.id, p.ids
 ORDER BY p.id
"""
INSERT_BATCH = ("INSERT INTO batches (status, worker_id, lease_token, lease_expires_at, "
                "attempts, leased_at) VALUES ('leased', %(worker)s, md5(random()::text), "
                "now() + interval '10 minutes', 1, now()) RETURNING id")
CLAIM_PAYLOAD = """
WITH sample AS MATERIALIZED (
    SELECT ctid FROM pending_payload TABLESAMPLE SYSTEM (CAST(%(pct)s AS real))
), picked AS (
    SELECT p.ctid FROM pending_payload p
     WHERE p.ctid = ANY (ARRAY(SELECT ctid FROM sample))
     ORDER BY random()
     LIMIT %(chunks)s
       FOR UPDATE SKIP LOCKED
), taken AS (
    DELETE FROM pending_payload
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM picked))
    RETURNING ids, id_j, url_j, caption_j, language_j, extra_j
), stored AS (
    INSERT INTO batch_members (batch_id, ids)
    SELECT %(batch_id)s, array_agg(u.id) FROM taken, unnest(taken.ids) AS u(id)
)
SELECT sum(cardinality(ids))::int AS n,
       '{"id":[' || string_agg(id_j, ',') || '],"url":[' || string_agg(url_j, ',')
       || '],"caption":[' || string_agg(caption_j, ',') || '],"language":['
       || string_agg(language_j, ',') || '],"extra":[' || string_agg(extra_j, ',')
       || '],"attempt":[' || rtrim(repeat('1,', sum(cardinality(ids))::int), ',')
       || ']}' AS candidates
  FROM taken
"""


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


def build_payload(conn: psycopg.Connection, rows: int) -> None:
    t0 = time.perf_counter()
    conn.execute(PAYLOAD_TABLE)
    conn.execute(BUILD_PAYLOAD)
    conn.execute("VACUUM ANALYZE pending_payload")
    conn.execute("VACUUM ANALYZE candidates, pending_chunks")
    conn.execute("CHECKPOINT")
    print(f"pending_payload built in {time.perf_counter() - t0:.1f} s", flush=True)
    for table in ("candidates", "pending_chunks", "pending_payload"):
        size = conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                            [table]).fetchone()[0]  # type: ignore[index]
        print(f"  {table}: {size / rows:.1f} bytes per candidate (heap, indexes, TOAST)",
              flush=True)


def payload_lease(conn: psycopg.Connection, worker: int, chunks: int,
                  pct: float) -> tuple[int, str]:
    with conn.transaction():
        batch = conn.execute(INSERT_BATCH, {"worker": worker}).fetchone()[0]  # type: ignore[index]
        n, body = conn.execute(CLAIM_PAYLOAD, {  # type: ignore[misc]
            "pct": pct, "chunks": chunks, "batch_id": batch}).fetchone()
        conn.execute("UPDATE batches SET size = %s WHERE id = %s", [n, batch])
    return int(n or 0), str(body)


def candidates_of(engine: sa.Engine, batch_id: int) -> int:
    """``batch_candidates`` of a leased batch, read only; how many."""
    with engine.connect() as conn:
        return int(conn.execute(Q.batch_candidates, {"batch_id": batch_id}).one().n)


def check_payload(conn: psycopg.Connection, body: str) -> None:
    """Every element of the payload lease's JSON equals its candidate's row."""
    data = json.loads(body)
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT id, url, caption, language, extra::text FROM candidates "
        "WHERE id = ANY(%s)", [data["id"]])}
    assert len(rows) == len(data["id"]) == len(data["url"]) == len(data["attempt"])
    for i, cid in enumerate(data["id"]):
        url, caption, language, extra = rows[cid]
        assert (data["url"][i], data["caption"][i], data["language"][i]) == (
            url, caption, language), cid
        assert data["extra"][i] == (json.loads(extra) if extra else {}), cid
    print(f"payload lease checked: {len(data['id'])} candidates equal their rows",
          flush=True)


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
        ensure_database(server.url(), "floor")
        url = server.url().rsplit("/", 1)[0] + "/floor"
        upgrade(url)
        load(url, work, args.rows)
        raw = psycopg.connect(libpq_url(url), autocommit=True)
        engine = sa.create_engine(url, pool_size=1, max_overflow=0)
        try:
            build_payload(raw, args.rows)
            run(engine, raw, args)
        finally:
            engine.dispose()
            raw.close()
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(engine: sa.Engine, raw: psycopg.Connection, args: argparse.Namespace) -> None:
    _, token = create_token(engine, "worker", "lease-floor")
    worker = touch_worker(engine, authenticate(engine, token))
    service = Leases(engine, make_lease_settings(batch_size=args.batch))
    with engine.connect() as conn:
        pid_a = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    pid_b = int(raw.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
    chunks = args.batch // 16
    total = int(raw.execute("SELECT count(*) FROM pending_payload").fetchone()[0])  # type: ignore[index]
    today, alone, payload = (Kind("today: lease_download_raw"),
                             Kind("today: batch_candidates alone (read only)"),
                             Kind("payload: batch + claim + concatenation"))
    body = ""
    for _ in range(args.leases):
        lease = timed(today, pid_a, lambda: service.lease_download_raw(worker))
        assert lease is not None
        today.sizes.append(lease.count)
        alone.sizes.append(timed(alone, pid_a, partial(candidates_of, engine,
                                                       lease.info.batch_id)))
        pct = min(100.0, 100.0 * 3 * chunks / max(1, total))
        n, body = timed(payload, pid_b, partial(payload_lease, raw, worker, chunks, pct))
        payload.sizes.append(n)
        total -= n // 16
    for kind in (today, alone, payload):
        kind.report()
    check_payload(raw, body)


if __name__ == "__main__":
    main()
