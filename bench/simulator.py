"""Virtual-worker load simulator: thousands of simulated download workers against real
``pairfarm coordinator`` processes and a real PostgreSQL.

    python bench/simulator.py --workers 2000 --candidates 4000000 --batch-size 1000 \\
        --download-mean 60 --lease-ttl 60 --processes 2

Setup (not measured): an embedded PostgreSQL 18 in a temporary directory (or the server
of --database-url), a fresh database migrated to head, --candidates synthetic candidates
in chunks of 16, one worker token per virtual worker (created up front), and ``pairfarm
coordinator --processes P`` in a subprocess.

Each virtual worker (one Trio task, all in this one process; --workers-per-client of them
share an httpx client with as many connections; --ramp spreads their starts) registers,
then loops: lease (204: wait --idle s, doubling while the answer stays 204 up to
--idle-max, and ask again until the farm is drained; 429: wait the Retry-After);
"download" for a time drawn from a log-normal distribution (--download-mean,
--download-sigma), heartbeating every TTL/3; then, by chance, completes (a DownloadReport
with shard files under ``s3://sim/``, outcomes that sum to the batch size, and
--retry-fraction of the batch reported as timeouts in its ``retry``: sent back for a URL
retry, due --url-retry-delay s later, as ``pairfarm worker`` sends its transient outcomes,
among the candidates below their last attempt), fails
(--fail-fraction: a fail report, an attempt spent) or is killed (--kill-fraction: it stops
calling, its lease expires after --lease-ttl and the reaper gives it back; the worker
comes back after --restart-delay, as systemd restarts a worker VM's service). As
``pairfarm worker``, a call that got no answer (a transport error, or a 5xx for a lease
or a registration) is sent again after the worker's backoff (1 s doubling to 60 s, equal
jitter); a heartbeat, completion or fail report is never dropped. A monitor ends the run
once nothing is pending or leased.

Reported: leases/s, client-side p50/p99/max of each call beside the coordinator's own
time for it (its ``Server-Timing`` header), the lease's client-side p50/p99/max by 30 s
window of when it was asked, with --hot-max-candidates the hot set against that bound
(the coordinator archives downloaded batches into the run's folder), how late the
simulator's event loop wakes a sleeping task (its own share of the client-side time),
errors by call and kind, the CPU seconds per lease of the coordinator processes and of
PostgreSQL (from /proc via psutil: each process tree, dead children included) and of the
simulator itself (all on the same cores here), the load average; then the invariants
read from the database (``check_invariants``): no candidate in two batches (nor in two
live ones), none lost (every candidate in exactly one batch, still pending or waiting
for a URL retry), the queue drained to zero; with an archive, every candidate hot or
archived once (the files' candidate ids distinct, as many as the archived totals). The
exit status is 1 when an invariant is broken.

Resource handling: the coordinator subprocess is stopped by its PID (SIGTERM), the
embedded PostgreSQL started here is stopped, the temporary directory removed.
Needs the [coordinator] and [worker] extras (httpx, trio) and psutil ([dev]).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
import sqlalchemy as sa  # noqa: E402
import trio  # noqa: E402

from coordinator.queries import Q  # noqa: E402
from coordinator.timing import app_seconds  # noqa: E402
from coordinator.tokens import hash_token, new_token  # noqa: E402
from pairfarm.client import KEEPALIVE_S  # noqa: E402
from pairfarm.protocol import API_PREFIX, Role  # noqa: E402
from worker.backoff import backoff_delay  # noqa: E402

SHA = "0" * 64
#: the worker's backoff after a call that got no answer (``pairfarm worker``'s
#: --backoff-base and --backoff-cap defaults)
BACKOFF_BASE_S, BACKOFF_CAP_S = 1.0, 60.0
#: the loop-lag probe's sleep, seconds
LAG_PROBE_S = 0.1
#: the calls timed; "lease 204" is a lease answered "nothing left" (timed apart)
OPS = ("register", "lease", "lease 204", "heartbeat", "complete", "fail")


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """What to simulate; the defaults are a small run."""

    workers: int = 50
    candidates: int = 3_000
    batch_size: int = 50
    #: mean and log-normal sigma of a batch's simulated download time, seconds
    download_mean_s: float = 1.0
    download_sigma: float = 0.3
    lease_ttl_s: float = 3.0
    reap_interval_s: float = 0.5
    max_attempts: int = 3
    fail_fraction: float = 0.05
    kill_fraction: float = 0.05
    #: share of each completed batch reported as timeouts and sent back for a URL retry
    #: (the report's ``retry``, as ``pairfarm worker`` sends its transient outcomes), of
    #: the candidates whose attempt is at most the lease's ``url_retries``
    retry_fraction: float = 0.05
    #: the coordinator's ``--url-retry-delay`` (a retry is due this long after the batch
    #: that sent it back; ``--url-retry-growth`` 1)
    url_retry_delay_s: float = 60.0
    #: a killed worker comes back (re-registers) after this long
    restart_delay_s: float = 1.0
    #: a worker answered 204 asks again after this long, doubled for each 204 in a row up
    #: to ``idle_max_s``, equal jitter (as ``pairfarm worker --idle-poll/--idle-poll-max``)
    idle_s: float = 1.0
    idle_max_s: float = 60.0
    #: the coordinator's ``--empty-hold``
    empty_hold_s: float = 1.0
    #: the workers start spread evenly over this many seconds (0: all at once)
    ramp_s: float = 0.0
    processes: int = 1
    #: virtual workers per httpx client (each client has as many connections): one pool
    #: for thousands of connections costs httpcore O(connections) per request
    workers_per_client: int = 16
    #: give up (report not drained) after this long
    max_run_s: float = 600.0
    #: seconds the virtual workers keep an idle connection (pairfarm's client: 60)
    client_keep_alive_s: float = KEEPALIVE_S
    #: the coordinator's ``--keep-alive`` (75)
    server_keep_alive_s: int = 75
    #: seconds between two readings of the CPU counters (``cpu_sampler``)
    cpu_sample_s: float = 2.0
    #: the coordinator's ``--hot-max-candidates`` (0: no archive); with it the coordinator
    #: archives finished batches (``--archive-downloaded``, ``--archive-min-age 0``) into
    #: the run's folder every ``archive_interval_s``
    hot_max_candidates: int = 0
    archive_interval_s: float = 5.0
    #: the candidates come in this many equal waves: the first before the workers start,
    #: each next one once fewer than half a wave is unfinished (as an operator feeds a
    #: farm whose hot set is bounded: a wave lifts the hot set by its size until the
    #: archive's next look); 1: all at once
    waves: int = 1
    #: seconds between two looks of the monitor (drained? next wave? the hot set)
    monitor_poll_s: float = 1.0
    seed: int = 0

    def wave_sizes(self) -> list[int]:
        """The candidates of each wave (the last one takes the remainder)."""
        wave = self.candidates // self.waves
        return [wave] * (self.waves - 1) + [self.candidates - wave * (self.waves - 1)]


@dataclass
class Calls:
    """Client-side latencies by call, errors by (call, kind), what the workers did."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    #: the coordinator's own time for the same calls (its ``Server-Timing`` header)
    server: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    #: when each timed call started (``perf_counter``), in the order of ``seconds``
    started: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    #: when the virtual workers started (``perf_counter``)
    t0: float = 0.0
    #: how late the simulator's event loop woke a task that slept ``LAG_PROBE_S``
    loop_lag: list[float] = field(default_factory=list)
    #: when each batch was leased (``perf_counter``)
    leased_at: list[float] = field(default_factory=list)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    #: the CPU counters, read every ``SimConfig.cpu_sample_s`` (``cpu_sampler``)
    cpu: list[CpuSample] = field(default_factory=list)
    #: with an archive: (``perf_counter``, hot candidates, candidates of finished batches
    #: still hot), read by the monitor
    hot: list[tuple[float, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Invariants:
    """The database's state at the end of a run."""

    candidates: int
    in_two_batches: int
    in_two_live_batches: int
    pending_and_batched: int
    lost: int
    pending_candidates: int
    #: candidates sent back for a URL retry (``retry_chunks``), waiting for a batch
    retry_waiting: int
    pending_batches: int
    leased_batches: int
    batches: dict[str, int]
    #: candidates the archive's totals hold (``archived_totals``)
    archived: int = 0
    #: rows and distinct candidate ids of the archive's parquet files
    archived_rows: int = 0
    archived_ids: int = 0

    @property
    def consistent(self) -> bool:
        """No candidate in two batches (live or not) or also pending, nor twice in the
        archive; none lost."""
        return (self.in_two_batches == 0 and self.in_two_live_batches == 0
                and self.pending_and_batched == 0 and self.lost == 0
                and self.archived_rows == self.archived_ids == self.archived)

    @property
    def drained(self) -> bool:
        return (self.pending_candidates == 0 and self.retry_waiting == 0
                and self.pending_batches == 0 and self.leased_batches == 0)


@dataclass(frozen=True)
class SimReport:
    config: SimConfig
    wall_s: float
    leases: int
    calls: Calls
    cpu_s: dict[str, float]
    invariants: Invariants
    load: tuple[float, float, float]
    #: the coordinator's ``pairfarm_empty_leases_total`` by ``answered`` (held / looked)
    empty_answers: dict[str, float] = field(default_factory=dict)

    @property
    def leases_per_s(self) -> float:
        return self.leases / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_leases_per_s(self) -> float:
        """Leases/s between the 10th and the 90th percentile lease (without the ramp
        and the drained tail)."""
        times = sorted(self.calls.leased_at)
        if len(times) < 10:
            return float("nan")
        lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
        return (len(times) * 8 // 10) / (hi - lo) if hi > lo else float("nan")

    @property
    def ok(self) -> bool:
        inv = self.invariants
        return (inv.consistent and inv.drained
                and inv.candidates + inv.archived == self.config.candidates)


# -- invariants -------------------------------------------------------------------------

_MEMBERS = "SELECT bm.batch_id, unnest(bm.ids) AS id FROM batch_members bm"
_INVARIANT_SQL = {
    "candidates": "SELECT count(*) FROM candidates",
    "in_two_batches": f"SELECT count(*) FROM (SELECT id FROM ({_MEMBERS}) m "
                      "GROUP BY id HAVING count(*) > 1) d",
    "in_two_live_batches": f"SELECT count(*) FROM (SELECT m.id FROM ({_MEMBERS}) m "
                           "JOIN batches b ON b.id = m.batch_id WHERE b.status = 'leased' "
                           "GROUP BY m.id HAVING count(*) > 1) d",
    "pending_and_batched": "SELECT count(*) FROM (SELECT unnest(ids) AS id FROM "
                           "pending_chunks UNION ALL SELECT unnest(ids) FROM retry_chunks"
                           f") p JOIN ({_MEMBERS}) m ON m.id = p.id",
    "lost": "SELECT count(*) FROM candidates c WHERE NOT EXISTS (SELECT 1 FROM "
            f"({_MEMBERS} UNION ALL SELECT 0, unnest(ids) FROM pending_chunks "
            "UNION ALL SELECT 0, unnest(ids) FROM retry_chunks) m "
            "WHERE m.id = c.id)",
    "pending_candidates": "SELECT COALESCE(sum(cardinality(ids)), 0) FROM pending_chunks",
    "retry_waiting": "SELECT COALESCE(sum(cardinality(ids)), 0) FROM retry_chunks",
    "pending_batches": "SELECT count(*) FROM batches WHERE status = 'pending'",
    "leased_batches": "SELECT count(*) FROM batches WHERE status = 'leased'",
    "archived": "SELECT COALESCE(sum(candidates), 0) FROM archived_totals",
}
#: hot candidates (ingested less archived), and those of finished batches
_HOT_SQL = sa.text(
    "SELECT (SELECT COALESCE(sum(inserted), 0) FROM ingests) "
    "- (SELECT COALESCE(sum(candidates), 0) FROM archived_totals), "
    "(SELECT COALESCE(sum(size), 0) FROM batches "
    "WHERE status IN ('downloaded', 'done', 'failed'))")


def check_invariants(engine: sa.Engine, archive: Path | None = None) -> Invariants:
    """Read the invariants of the lease queue from the database (one snapshot), and the
    candidate ids of the parquet files in ``archive``."""
    with engine.connect() as conn:
        conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        counts = {k: int(conn.execute(sa.text(q)).scalar_one())
                  for k, q in _INVARIANT_SQL.items()}
        batches = {str(s): int(n) for s, n in conn.execute(sa.text(
            "SELECT status, count(*) FROM batches GROUP BY status"))}
    rows, ids = archived_ids(archive) if archive is not None else (0, 0)
    return Invariants(**counts, batches=batches, archived_rows=rows, archived_ids=ids)


def archived_ids(folder: Path) -> tuple[int, int]:
    """Rows and distinct candidate ids of the archive files in ``folder``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(folder.glob("batches-*.parquet"))
    if not files:
        return 0, 0
    ids = pa.chunked_array([pq.read_table(f, columns=["candidate_id"])["candidate_id"]
                            for f in files])
    return len(ids), pc.count_distinct(ids).as_py()


# -- setup ------------------------------------------------------------------------------

def fill(engine: sa.Engine, candidates: int, *, analyze: bool = True) -> None:
    """``candidates`` synthetic candidates in pending chunks of 16 with their lease
    payload's fragments (as ``pairfarm ingest`` writes them), then (``analyze``) VACUUM
    ANALYZE."""
    with engine.begin() as conn:
        first, last = conn.execute(sa.text(
            "WITH inserted AS (INSERT INTO candidates (url, caption) "
            "SELECT 'http://img' || (i % 100000) || '.example.com/' || i || '.jpg', "
            "'a photo of item ' || i FROM generate_series(1, CAST(:n AS bigint)) i "
            "RETURNING id) SELECT min(id), max(id) FROM inserted"), {"n": candidates}).one()
        conn.execute(Q.chunk_candidates, {"first": first, "last": last})
        conn.execute(sa.text("INSERT INTO ingests (source, inserted) VALUES ('simulator', :n)"),
                     {"n": candidates})
    if not analyze:
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE candidates, pending_chunks"))


def make_tokens(engine: sa.Engine, count: int) -> list[str]:
    """``count`` worker tokens, stored (hashed) in one transaction."""
    values = [new_token(Role.WORKER) for _ in range(count)]
    with engine.begin() as conn:
        for i, value in enumerate(values):
            conn.execute(Q.insert_token, {"role": "worker", "name": f"sim-{i:05d}",
                                          "token_sha256": hash_token(value)})
    return values


@contextlib.contextmanager
def coordinator(database_url: str, config: SimConfig, log: Path) -> Iterator[tuple[str, int]]:
    """``pairfarm coordinator`` in a subprocess: yields its base URL and PID."""
    with socket_port() as port:
        pass
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": database_url}
    args = [sys.executable, "-m", "pairfarm", "coordinator", "--port", str(port),
            "--processes", str(config.processes), "--batch-size", str(config.batch_size),
            "--lease-ttl", str(config.lease_ttl_s), "--reap-interval",
            str(config.reap_interval_s), "--max-attempts", str(config.max_attempts),
            "--empty-hold", str(config.empty_hold_s), "--shard-prefix", "s3://sim/",
            "--keep-alive", str(config.server_keep_alive_s),
            "--url-retry-delay", str(config.url_retry_delay_s), "--url-retry-growth", "1"]
    if config.hot_max_candidates:
        args += ["--hot-max-candidates", str(config.hot_max_candidates), "--archive-to",
                 str(log.parent / "archive"), "--archive-downloaded", "--archive-min-age",
                 "0", "--archive-interval", str(config.archive_interval_s)]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"coordinator did not answer /healthz:\n{log.read_text()}")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children: live ones, and the dead ones it
    waited for (``cutime``/``cstime``)."""
    try:
        root = psutil.Process(pid)
        total = _cpu(root.cpu_times(), children=True)
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += _cpu(child.cpu_times(), children=True)
    except psutil.Error:
        return 0.0
    return total


def _cpu(t: Any, *, children: bool) -> float:
    return float(t.user + t.system + (t.children_user + t.children_system if children else 0))


#: PostgreSQL's processes by the title it gives them (``postgres: autovacuum worker``...)
PG_KINDS = ("autovacuum", "checkpointer", "walwriter", "background writer")


def postgres_cpu_s(postmaster: int) -> dict[str, float]:
    """CPU seconds of a PostgreSQL server by kind of process: ``backend`` (the client
    connections), each of ``PG_KINDS``, ``other`` (the postmaster, the other background
    processes and the children that exited: an autovacuum worker is one)."""
    found = dict.fromkeys(("backend", *PG_KINDS, "other"), 0.0)
    try:
        root = psutil.Process(postmaster)
        found["other"] += _cpu(root.cpu_times(), children=True)
        for child in root.children():
            with contextlib.suppress(psutil.Error):
                title = " ".join(child.cmdline())
                kind = next((k for k in PG_KINDS if k in title), None)
                if kind is None:
                    kind = "backend" if _is_backend(title) else "other"
                found[kind] += _cpu(child.cpu_times(), children=False)
    except psutil.Error:
        pass
    return found


def _is_backend(title: str) -> bool:
    """A client connection's title: ``postgres: USER DATABASE HOST(PORT) STATE``."""
    return "(" in title and ")" in title


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far at ``perf_counter`` time ``t``: the coordinator's tree, the
    simulator, and PostgreSQL by kind (``postgres_cpu_s``)."""

    t: float
    coordinator: float
    simulator: float
    postgres: dict[str, float]

    def minus(self, other: CpuSample) -> dict[str, float]:
        out = {"coordinator": self.coordinator - other.coordinator,
               "simulator": self.simulator - other.simulator}
        out.update({f"postgres {k}": v - other.postgres.get(k, 0.0)
                    for k, v in self.postgres.items()})
        return out


def cpu_sample(coordinator_pid: int, postmaster: int) -> CpuSample:
    return CpuSample(t=time.perf_counter(), coordinator=tree_cpu_s(coordinator_pid),
                     simulator=time.process_time(), postgres=postgres_cpu_s(postmaster))


# -- the virtual workers ----------------------------------------------------------------

def retry_wait(attempt: int, rng: random.Random) -> float:
    """Seconds before sending again a call that got no answer ``attempt`` times in a row:
    the worker's backoff."""
    return backoff_delay(attempt, base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S, rng=rng)


class Farm:
    """The virtual workers' shared state: the client pools, the calls, the end."""

    def __init__(self, base: str, config: SimConfig, clients: list[httpx.AsyncClient]) -> None:
        self.base = base + API_PREFIX
        self.config = config
        self.clients = clients
        self.calls = Calls()
        self.drained = trio.Event()
        self.drained_at: float | None = None
        self.rng = random.Random(config.seed)

    async def call_until_answered(self, op: str, path: str, me: Me, body: dict[str, object]
                                  ) -> httpx.Response | None:
        """``call``, retried after a transport error with the worker's backoff (1 s
        doubling to 60 s, equal jitter), as ``pairfarm worker`` retries a heartbeat, a
        completion or a fail report; None when the farm was drained meanwhile."""
        attempt = 0
        while not self.drained.is_set():
            response = await self.call(op, path, me, body)
            if response is not None:
                return response
            self.calls.events[f"{op}_retried"] += 1
            await trio.sleep(retry_wait(attempt, self.rng))
            attempt += 1
        return None

    async def call(self, op: str, path: str, me: Me, body: dict[str, object]
                   ) -> httpx.Response | None:
        """POST ``body`` as ``me``; the latency is recorded under ``op``; None on a
        transport error (counted by its class)."""
        client = self.clients[me.index // self.config.workers_per_client]
        t0 = time.perf_counter()
        try:
            response = await client.post(
                self.base + path, content=orjson.dumps(body),
                headers={"Authorization": f"Bearer {me.token}",
                         "Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            self.calls.errors[(op, type(exc).__name__)] += 1
            return None
        key = f"{op} 204" if response.status_code == 204 else op
        self.calls.seconds[key].append(time.perf_counter() - t0)
        self.calls.started[key].append(t0)
        server = app_seconds(response.headers.get("server-timing"))
        if server is not None:
            self.calls.server[key].append(server)
        if response.status_code >= 400:
            self.calls.errors[(op, str(response.status_code))] += 1
        return response

    def download_time(self) -> float:
        mean, sigma = self.config.download_mean_s, self.config.download_sigma
        if mean <= 0:
            return 0.0
        return self.rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


@dataclass(frozen=True)
class Me:
    """A virtual worker: its number (which client it calls through) and its token."""

    index: int
    token: str


async def virtual_worker(farm: Farm, me: Me) -> None:
    """Register, then lease / download / complete-fail-or-die until the farm is drained."""
    cfg = farm.config
    registered = False
    empty = 0  # leases in a row answered 204
    unanswered = 0  # calls in a row without an answer (a transport error or a 5xx)
    await trio.sleep(cfg.ramp_s * me.index / max(1, cfg.workers))
    while not farm.drained.is_set():
        if not registered:
            registered = await _register(farm, me)
            if not registered:
                await trio.sleep(retry_wait(unanswered, farm.rng))
                unanswered += 1
                continue
        response = await farm.call("lease", "/download/lease", me, {})
        if response is None or response.status_code >= 500:
            await trio.sleep(retry_wait(unanswered, farm.rng))
            unanswered += 1
            continue
        unanswered = 0
        if response.status_code == 204:
            farm.calls.events["idle"] += 1
            await trio.sleep(backoff_delay(empty, base=cfg.idle_s,
                                           cap=max(cfg.idle_s, cfg.idle_max_s), rng=farm.rng))
            empty += 1
        elif response.status_code == 429:
            await trio.sleep(float(response.headers.get("retry-after", cfg.idle_s)))
        elif response.status_code == 200:
            empty = 0
            farm.calls.events["leased"] += 1
            farm.calls.leased_at.append(time.perf_counter())
            registered = await _work(farm, me, response.content)


async def _register(farm: Farm, me: Me) -> bool:
    response = await farm.call("register", "/register", me,
                               {"name": f"sim-{me.index:05d}", "version": "simulator"})
    return response is not None and response.status_code == 200


#: where a lease body's candidates start, as the coordinator writes it
# (``RawDownloadLease.to_json``): the lease fields first, then the columns, ids first
_CANDIDATES = b',"candidates":{"id":['


_ATTEMPT = b',"attempt":['


def _split(body: bytes) -> tuple[dict[str, Any], bytes] | None:
    """A lease body's fields before its candidates (parsed) and its ids array's text, as
    the coordinator lays it out; None for any other layout."""
    start = body.find(_CANDIDATES)
    end = body.find(b"]", start + len(_CANDIDATES)) if start >= 0 else -1
    if end < 0:
        return None
    return orjson.loads(body[:start] + b"}"), body[start + len(_CANDIDATES):end]


def lease_retryable(body: bytes) -> list[int]:
    """The ids of a lease body's candidates that may be sent back for a URL retry: those
    whose attempt is at most the lease's ``url_retries``. Only the id and attempt
    arrays are parsed (the others are never needed)."""
    split, at = _split(body), body.rfind(_ATTEMPT)
    if split is None or at < 0:
        lease = orjson.loads(body)
        ids, attempts = lease["candidates"]["id"], lease["candidates"]["attempt"]
        limit = int(lease.get("url_retries", 0))
    else:
        head, id_text = split
        limit = int(head.get("url_retries", 0))
        ids = orjson.loads(b"[" + id_text + b"]")
        tail = body[at + len(_ATTEMPT) - 1:]
        attempts = orjson.loads(tail[:tail.find(b"]") + 1])
    return [i for i, a in zip(ids, attempts, strict=True) if a <= limit]


def lease_head(body: bytes) -> tuple[int, str, int]:
    """A lease body's batch id, lease token and candidate count, without building its
    10^4 x 5 Python objects: the fields before the candidates are parsed, the ids
    counted. Any other layout is parsed whole."""
    split = _split(body)
    if split is None:
        lease = orjson.loads(body)
        return (int(lease["batch_id"]), str(lease["lease_token"]),
                len(lease["candidates"]["id"]))
    head, id_text = split
    count = id_text.count(b",") + 1 if id_text.strip() else 0
    return int(head["batch_id"]), str(head["lease_token"]), count


async def _work(farm: Farm, me: Me, body: bytes) -> bool:
    """One leased batch; False when the worker was killed (it registers again)."""
    cfg = farm.config
    batch_id, lease_token, size = lease_head(body)
    fate = farm.rng.random()
    if fate < cfg.kill_fraction:
        farm.calls.events["killed"] += 1
        await trio.sleep(cfg.restart_delay_s)
        return False
    seconds = farm.download_time()
    if not await _download(farm, me, batch_id, lease_token, seconds):
        farm.calls.events["lease_lost"] += 1
        return True
    if fate < cfg.kill_fraction + cfg.fail_fraction:
        response = await farm.call_until_answered("fail", f"/download/{batch_id}/fail", me,
                                   {"lease_token": lease_token, "reason": "simulated failure"})
        farm.calls.events["failed" if _ok(response) else "fail_refused"] += 1
        return True
    retry = _retry_ids(farm, body, size)
    farm.calls.events["sent back"] += len(retry)
    response = await farm.call_until_answered(
        "complete", f"/download/{batch_id}/complete", me,
        _report(batch_id, lease_token, size, seconds, retry))
    farm.calls.events["completed" if _ok(response) else "complete_refused"] += 1
    return True


async def _download(farm: Farm, me: Me, batch_id: int, lease_token: str,
                    seconds: float) -> bool:
    """Sleep ``seconds``, heartbeating every TTL/3; False when a heartbeat is refused."""
    interval = farm.config.lease_ttl_s / 3
    deadline = trio.current_time() + seconds
    while (left := deadline - trio.current_time()) > 0:
        await trio.sleep(min(interval, left))
        if trio.current_time() >= deadline:
            break
        response = await farm.call_until_answered(
            "heartbeat", f"/download/{batch_id}/heartbeat", me, {"lease_token": lease_token})
        if response is not None and response.status_code == 409:
            return False
    return True


def _ok(response: httpx.Response | None) -> bool:
    return response is not None and response.status_code == 200


def _retry_ids(farm: Farm, body: bytes, size: int) -> list[int]:
    """``retry_fraction`` of the batch, drawn from the candidates that may be retried."""
    want = round(size * farm.config.retry_fraction)
    if want <= 0:
        return []
    retryable = lease_retryable(body)
    return farm.rng.sample(retryable, min(want, len(retryable)))


def _report(batch_id: int, lease_token: str, size: int, seconds: float,
            retry: list[int] | None = None) -> dict[str, object]:
    """A plausible DownloadReport: ~70 % ok, the rest spread over failure classes; the
    ``retry`` ids are timeouts sent back for a URL retry (counted in ``timeout`` too)."""
    retry = retry or []
    ok = min(size * 7 // 10, size - len(retry))
    timeout = max((size - ok) // 2, len(retry))
    stem = f"s3://sim/shards/{batch_id:08d}"
    return {"lease_token": lease_token,
            "shard": {"tar": f"{stem}.tar", "parquet": f"{stem}.parquet",
                      "stats": f"{stem}_stats.json", "tar_sha256": SHA,
                      "parquet_sha256": SHA, "tar_bytes": ok * 30_000},
            "outcomes": {k: v for k, v in (("ok", ok), ("timeout", timeout),
                                           ("http_4xx", size - ok - timeout)) if v},
            "bytes_downloaded": ok * 30_000, "duration_s": seconds,
            **({"retry": {"timeout": retry}} if retry else {})}


async def monitor(farm: Farm, engine: sa.Engine, poll_s: float = 1.0) -> None:
    """Set ``farm.drained`` once no candidate is pending or waiting for a URL retry and
    no batch is pending or leased, and every wave is in; ingest the next wave once fewer
    than half a wave is unfinished (``SimConfig.waves``)."""
    # the first pending chunk by the primary key, not count(*) (which reads ~10^6 rows
    # every second) nor EXISTS (which PostgreSQL plans as a scan of the heap from its
    # first page: all of it once the table is nearly drained and not yet vacuumed)
    query = sa.text("SELECT (SELECT id FROM pending_chunks ORDER BY id LIMIT 1) IS NOT NULL "
                    "OR EXISTS (SELECT 1 FROM batches WHERE status IN ('pending', 'leased')) "
                    "OR EXISTS (SELECT 1 FROM retry_chunks)")

    waves, bound = farm.config.wave_sizes()[1:], farm.config.hot_max_candidates

    def busy() -> bool:
        with engine.connect() as conn:
            left = bool(conn.execute(query).scalar_one())
            if not (waves or bound):  # nothing else to look at
                return left
            hot, finished = (int(x) for x in conn.execute(_HOT_SQL).one())
        if bound:
            farm.calls.hot.append((time.perf_counter(), hot, finished))
        if waves and hot - finished < waves[0] // 2:
            fill(engine, waves.pop(0), analyze=False)
            farm.calls.events["waves ingested"] += 1
            return True
        return left or bool(waves)

    while True:
        if not await trio.to_thread.run_sync(busy):
            break
        await trio.sleep(poll_s)
    farm.drained_at = time.perf_counter()
    farm.drained.set()


async def lag_probe(farm: Farm) -> None:
    """Sleep ``LAG_PROBE_S`` again and again, recording how late each wake-up came: the
    share of a call's client-side time that is the simulator's own busy event loop;
    until the farm is drained."""
    while not farm.drained.is_set():
        t0 = time.perf_counter()
        await trio.sleep(LAG_PROBE_S)
        farm.calls.loop_lag.append(max(0.0, time.perf_counter() - t0 - LAG_PROBE_S))


async def cpu_sampler(farm: Farm, pids: tuple[int, int]) -> None:
    """Read the CPU counters every ``cpu_sample_s`` until the farm is drained, so that
    the report can give the CPU of the steady state alone (``steady_window``)."""
    while not farm.drained.is_set():
        farm.calls.cpu.append(await trio.to_thread.run_sync(cpu_sample, *pids))
        await trio.sleep(farm.config.cpu_sample_s)
    farm.calls.cpu.append(await trio.to_thread.run_sync(cpu_sample, *pids))


async def simulate(base: str, config: SimConfig, tokens: list[str],
                   engine: sa.Engine, pids: tuple[int, int]) -> tuple[Calls, float | None]:
    """Run the virtual workers until the farm is drained or ``max_run_s`` passes; the
    calls, and the ``perf_counter`` time at which it was seen drained (None: never)."""
    per = config.workers_per_client
    # idle connections are kept as pairfarm's coordinator client keeps them (60 s): let
    # go before the coordinator's --keep-alive closes them
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per,
                          keepalive_expiry=config.client_keep_alive_s)
    timeout = httpx.Timeout(60.0, pool=None)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(limits=limits,
                                                                     timeout=timeout))
                   for _ in range(math.ceil(config.workers / per))]
        farm = Farm(base, config, clients)
        farm.calls.t0 = time.perf_counter()
        with trio.move_on_after(config.max_run_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor, farm, engine, config.monitor_poll_s)
                nursery.start_soon(lag_probe, farm)
                nursery.start_soon(cpu_sampler, farm, pids)
                for i, token in enumerate(tokens):
                    nursery.start_soon(virtual_worker, farm, Me(i, token))
        return farm.calls, farm.drained_at


# -- a whole run ------------------------------------------------------------------------

def run(config: SimConfig, database_url: str, postgres_pid: int, work: Path, *,
        filled: bool = False) -> SimReport:
    """Fill ``database_url`` (a migrated, empty database; ``filled``: copied from a filled
    template), start the coordinator, run the virtual workers, measure, and check the
    invariants."""
    engine = sa.create_engine(database_url)
    try:
        if not filled:
            fill(engine, config.wave_sizes()[0])
        tokens = make_tokens(engine, config.workers)
        with coordinator(database_url, config, work / "coordinator.log") as (base, pid):
            cpu0 = {"coordinator": tree_cpu_s(pid), "postgres": tree_cpu_s(postgres_pid)}
            t0, own0 = time.perf_counter(), time.process_time()
            calls, drained_at = trio.run(simulate, base, config, tokens, engine,
                                          (pid, postgres_pid))
            wall = (drained_at or time.perf_counter()) - t0
            cpu = {"coordinator": tree_cpu_s(pid) - cpu0["coordinator"],
                   "postgres": tree_cpu_s(postgres_pid) - cpu0["postgres"],
                   "simulator": time.process_time() - own0}
            empty = empty_answers(base)
        archive = work / "archive" if config.hot_max_candidates else None
        invariants = check_invariants(engine, archive)
    finally:
        engine.dispose()
    return SimReport(config=config, wall_s=wall, leases=calls.events["leased"], calls=calls,
                     cpu_s=cpu, invariants=invariants, load=os.getloadavg(),
                     empty_answers=empty)


def empty_answers(base: str) -> dict[str, float]:
    """``pairfarm_empty_leases_total`` by ``answered``, from the coordinator's /metrics
    (summed over its processes)."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("pairfarm_empty_leases_total{"):
            labels, _, value = line.partition("} ")
            found[labels.split('answered="')[1].rstrip('"')] = float(value)
    return found


#: the width of ``describe_timeline``'s windows
TIMELINE_STEP_S = 30.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def describe(report: SimReport) -> list[str]:
    """The report as lines of text."""
    c, inv = report.config, report.invariants
    lines = [
        f"config: {c.workers} workers, {c.candidates:,} candidates, batch {c.batch_size}, "
        f"download mean {c.download_mean_s} s (sigma {c.download_sigma}), lease TTL "
        f"{c.lease_ttl_s} s, fail {c.fail_fraction:.0%}, kill {c.kill_fraction:.0%}, "
        f"URL retries {c.retry_fraction:.0%} of a batch (due after {c.url_retry_delay_s} s), "
        f"ramp {c.ramp_s} s, {c.processes} coordinator process(es)",
        f"wall {report.wall_s:.1f} s: {report.leases} leases, {report.leases_per_s:.1f} "
        f"leases/s ({report.steady_leases_per_s:.1f}/s from the 10th to the 90th "
        f"percentile lease); load average {' '.join(f'{x:.2f}' for x in report.load)}",
    ]
    for op in OPS:
        ms = [s * 1000 for s in report.calls.seconds[op]]
        if ms:
            lines.append(f"  {op:10s} n={len(ms):6d} p50={percentile(ms, 50):8.1f} ms "
                         f"p99={percentile(ms, 99):8.1f} ms max={max(ms):8.1f} ms"
                         + _server_part(report.calls.server[op]))
    later = after_first_round(report)
    if later:
        lines.append(f"  leases asked after the ramp and a first download ({len(later)}): "
                     f"p50={percentile(later, 50):.1f} ms p99={percentile(later, 99):.1f} ms "
                     f"max={max(later):.1f} ms")
    lag = [s * 1000 for s in report.calls.loop_lag]
    if lag:
        lines.append(f"simulator loop lag ({LAG_PROBE_S * 1000:.0f} ms sleeps): "
                     f"p50={percentile(lag, 50):.1f} ms p99={percentile(lag, 99):.1f} ms "
                     f"max={max(lag):.1f} ms")
    errors = ", ".join(f"{op} {kind}: {n}" for (op, kind), n in sorted(report.calls.errors.items()))
    lines.append(f"errors: {errors or 'none'}")
    lines.append("events: " + ", ".join(f"{k} {v}" for k, v in sorted(report.calls.events.items())))
    lines.append("coordinator's empty answers: " + (", ".join(
        f"{k} {v:.0f}" for k, v in sorted(report.empty_answers.items())) or "none"))
    per = max(1, report.leases)
    lines.append("CPU per lease: " + ", ".join(
        f"{k} {1000 * v / per:.1f} ms" for k, v in report.cpu_s.items())
        + f" (totals: {', '.join(f'{k} {v:.1f} s' for k, v in report.cpu_s.items())})")
    lines.extend(describe_window(report))
    lines.extend(describe_timeline(report))
    lines.extend(describe_hot(report))
    lines.append(
        f"invariants: candidates {inv.candidates:,}, in two batches {inv.in_two_batches}, "
        f"in two live batches {inv.in_two_live_batches}, pending and batched "
        f"{inv.pending_and_batched}, lost {inv.lost}; left: {inv.pending_candidates} "
        f"pending candidates, {inv.retry_waiting} waiting for a retry, "
        f"{inv.pending_batches} pending and {inv.leased_batches} leased batches; batches "
        f"{inv.batches}; archived {inv.archived:,}")
    lines.append(f"verdict: {'OK' if report.ok else 'BROKEN'} (consistent "
                 f"{inv.consistent}, drained {inv.drained})")
    return lines


@dataclass(frozen=True)
class Window:
    """The steady state: from the ramp's end plus one mean download to the 90th
    percentile lease, bounded by two CPU samples."""

    seconds: float
    leases: int
    #: calls a second by ``OPS`` name, started in the window
    rates: dict[str, float]
    #: CPU seconds in the window by part (``CpuSample.minus``)
    cpu_s: dict[str, float]


def steady_window(report: SimReport) -> Window | None:
    """The steady window of ``report``; None when the run has none (a single round, or
    too few samples)."""
    calls, c = report.calls, report.config
    leased = sorted(calls.leased_at)
    if len(leased) < 10:
        return None
    since, until = calls.t0 + c.ramp_s + c.download_mean_s, leased[len(leased) * 9 // 10]
    inside = [x for x in calls.cpu if since <= x.t <= until]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    seconds = b.t - a.t
    rates = {op: sum(1 for t in calls.started[op] if a.t <= t < b.t) / seconds for op in OPS}
    return Window(seconds=seconds, leases=sum(1 for t in leased if a.t <= t < b.t),
                  rates=rates, cpu_s=b.minus(a))


def describe_window(report: SimReport) -> list[str]:
    window = steady_window(report)
    if window is None or window.leases == 0:
        return ["steady window: none (fewer than two CPU samples after the ramp and one "
                "mean download, before the 90th-percentile lease)"]
    per, cpu = window.leases, window.cpu_s
    pg = {k.removeprefix("postgres "): v for k, v in cpu.items() if k.startswith("postgres ")}
    return [
        f"steady window {window.seconds:.0f} s (the ramp and one mean download to the "
        f"90th-percentile lease): {window.leases} leases ({window.leases / window.seconds:.1f}"
        "/s); calls/s " + ", ".join(f"{op} {r:.1f}" for op, r in window.rates.items() if r),
        f"  CPU per lease in it: coordinator {1000 * cpu['coordinator'] / per:.1f} ms, "
        f"PostgreSQL {1000 * sum(pg.values()) / per:.1f} ms ("
        + ", ".join(f"{k} {1000 * v / per:.1f}" for k, v in pg.items())
        + f"), simulator {1000 * cpu['simulator'] / per:.1f} ms; cores busy: coordinator "
        f"{cpu['coordinator'] / window.seconds:.2f}, PostgreSQL "
        f"{sum(pg.values()) / window.seconds:.2f}, simulator "
        f"{cpu['simulator'] / window.seconds:.2f}",
    ]


def describe_timeline(report: SimReport, step_s: float = TIMELINE_STEP_S) -> list[str]:
    """Client-side lease latency by ``step_s`` window of when the lease was asked (from
    the workers' start), with the other calls started in the window: where slow leases
    fall (the ramp, a round's end, the drained tail)."""
    calls = report.calls
    windows: dict[int, list[float]] = {}
    for s, t in zip(calls.seconds["lease"], calls.started["lease"], strict=True):
        windows.setdefault(int((t - calls.t0) // step_s), []).append(s * 1000)
    others: Counter[int] = Counter(int((t - calls.t0) // step_s) for op in OPS
                                   if op != "lease" for t in calls.started[op])
    lines = [f"leases by {step_s:.0f} s window (client ms):"]
    for k in sorted(windows):
        ms = windows[k]
        lines.append(f"  {k * step_s:6.0f} s n={len(ms):5d} p50={percentile(ms, 50):8.1f} "
                     f"p99={percentile(ms, 99):8.1f} max={max(ms):8.1f}; other calls "
                     f"{others[k]}")
    return lines


def describe_hot(report: SimReport) -> list[str]:
    """The hot set against the archive's bound: its largest size, its largest size once
    it had first come down to the bound (it starts with every candidate pending, and
    pending ones are never archived), and the finished candidates still hot."""
    bound, samples = report.config.hot_max_candidates, report.calls.hot
    if not bound or not samples:
        return []
    reached = next((i for i, (_, hot, _) in enumerate(samples) if hot <= bound), None)
    after = max(hot for _, hot, _ in samples[reached:]) if reached is not None else None
    return [f"hot set (bound {bound:,}, archive every {report.config.archive_interval_s} s): "
            f"max {max(h for _, h, _ in samples):,}; after it first came down to the "
            f"bound: max {after if after is None else f'{after:,}'}, over the bound for "
            f"{over_bound_s(samples, bound, reached or 0):.1f} s at most at a time; "
            f"finished candidates "
            f"still hot: max {max(f for _, _, f in samples):,}; archived "
            f"{report.invariants.archived:,} candidates ({report.invariants.archived_rows:,} "
            f"rows, {report.invariants.archived_ids:,} distinct ids in the files)"]


def over_bound_s(samples: list[tuple[float, int, int]], bound: int, since: int = 0) -> float:
    """The longest run of consecutive samples (from index ``since``) with the hot set over
    ``bound``, in seconds from its first such sample to the first one back under it."""
    longest, start = 0.0, None
    for t, hot, _ in samples[since:]:
        if hot > bound and start is None:
            start = t
        elif hot <= bound and start is not None:
            longest, start = max(longest, t - start), None
    if start is not None:
        longest = max(longest, samples[-1][0] - start)
    return longest


def after_first_round(report: SimReport) -> list[float]:
    """Client-side milliseconds of the leases asked once the ramp and one mean download
    time had passed: the farm's steady state, without the first round's burst."""
    calls, c = report.calls, report.config
    since = calls.t0 + c.ramp_s + c.download_mean_s
    return [s * 1000 for s, t in zip(calls.seconds["lease"], calls.started["lease"],
                                     strict=True) if t >= since]


def _server_part(seconds: list[float]) -> str:
    """The coordinator's own p50/p99 of a call (Server-Timing), or nothing."""
    if not seconds:
        return ""
    ms = [s * 1000 for s in seconds]
    return f"; in the app p50={percentile(ms, 50):.1f} ms p99={percentile(ms, 99):.1f} ms"


def _parse(argv: list[str] | None) -> tuple[SimConfig, str | None, str | None]:
    d = SimConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--download-mean", type=float, default=d.download_mean_s)
    p.add_argument("--download-sigma", type=float, default=d.download_sigma)
    p.add_argument("--lease-ttl", type=float, default=d.lease_ttl_s)
    p.add_argument("--reap-interval", type=float, default=d.reap_interval_s)
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--fail-fraction", type=float, default=d.fail_fraction)
    p.add_argument("--kill-fraction", type=float, default=d.kill_fraction)
    p.add_argument("--retry-fraction", type=float, default=d.retry_fraction,
                   help="share of each completed batch sent back for a URL retry "
                        "(timeouts in the report's retry)")
    p.add_argument("--url-retry-delay", type=float, default=d.url_retry_delay_s,
                   help="the coordinator's --url-retry-delay (growth 1)")
    p.add_argument("--restart-delay", type=float, default=d.restart_delay_s)
    p.add_argument("--idle", type=float, default=d.idle_s,
                   help="seconds a worker answered 204 first waits (pairfarm worker: 10)")
    p.add_argument("--idle-max", type=float, default=d.idle_max_s,
                   help="longest wait of a worker answered 204 again and again (60)")
    p.add_argument("--empty-hold", type=float, default=d.empty_hold_s,
                   help="the coordinator's --empty-hold (0: every lease looks)")
    p.add_argument("--ramp", type=float, default=d.ramp_s)
    p.add_argument("--hot-max-candidates", type=int, default=d.hot_max_candidates,
                   help="the coordinator's --hot-max-candidates (0: no archive), archiving "
                        "downloaded batches into the run's folder")
    p.add_argument("--archive-interval", type=float, default=d.archive_interval_s,
                   help="the coordinator's --archive-interval")
    p.add_argument("--waves", type=int, default=d.waves,
                   help="ingest the candidates in this many equal waves, each next one "
                        "once fewer than half a wave is unfinished (not with --template)")
    p.add_argument("--processes", type=int, default=d.processes)
    p.add_argument("--workers-per-client", type=int, default=d.workers_per_client)
    p.add_argument("--max-run", type=float, default=d.max_run_s)
    p.add_argument("--client-keep-alive", type=float, default=d.client_keep_alive_s,
                   help="seconds a virtual worker keeps an idle connection (pairfarm's "
                        "client: 60)")
    p.add_argument("--server-keep-alive", type=int, default=d.server_keep_alive_s,
                   help="the coordinator's --keep-alive (75)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--database-url", default=None,
                   help="a PostgreSQL server (its database 'pairfarm_sim' is dropped and "
                        "made again); default: an embedded one in a temporary directory")
    p.add_argument("--template", default=None, metavar="NAME",
                   help="with --database-url: keep the filled candidates in database NAME "
                        "(made and filled by the first run) and copy it for each run "
                        "instead of filling again")
    a = p.parse_args(argv)
    if a.template and not a.database_url:
        p.error("--template needs --database-url (the embedded server is removed after a run)")
    if a.template and a.waves > 1:
        p.error("--waves fills the database during the run: not with --template")
    config = SimConfig(
        workers=a.workers, candidates=a.candidates, batch_size=a.batch_size,
        download_mean_s=a.download_mean, download_sigma=a.download_sigma,
        lease_ttl_s=a.lease_ttl, reap_interval_s=a.reap_interval,
        max_attempts=a.max_attempts, fail_fraction=a.fail_fraction,
        kill_fraction=a.kill_fraction, retry_fraction=a.retry_fraction,
        url_retry_delay_s=a.url_retry_delay, restart_delay_s=a.restart_delay, idle_s=a.idle,
        idle_max_s=a.idle_max, empty_hold_s=a.empty_hold,
        ramp_s=a.ramp, processes=a.processes, workers_per_client=a.workers_per_client,
        max_run_s=a.max_run, seed=a.seed, client_keep_alive_s=a.client_keep_alive,
        server_keep_alive_s=a.server_keep_alive, hot_max_candidates=a.hot_max_candidates,
        archive_interval_s=a.archive_interval, waves=max(1, a.waves))
    return config, a.database_url, a.template


def main(argv: list[str] | None = None) -> int:
    from coordinator.db import ensure_database
    from coordinator.embedded_pg import EmbeddedPostgres
    from coordinator.migrate import upgrade

    config, server_url, template = _parse(argv)
    work = Path(tempfile.mkdtemp(prefix="pairfarm-sim-"))
    pg = None
    try:
        if server_url is None:
            pg = EmbeddedPostgres(work / "data", settings={"shared_buffers": "512MB"})
            server = pg.start()
            server_url, pg_pid = server.url(), server.pid
        else:
            pg_pid = _postmaster_pid(server_url)
        if template:
            url = _copy_of_template(server_url, template, config.candidates, upgrade)
        else:
            url = _fresh_database(server_url, "pairfarm_sim", ensure_database)
            upgrade(url)
        print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}; PostgreSQL pid {pg_pid}",
              flush=True)
        report = run(config, url, pg_pid, work, filled=template is not None)
        print("\n".join(describe(report)), flush=True)
        return 0 if report.ok else 1
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def _fresh_database(server_url: str, name: str, ensure: object) -> str:
    import psycopg

    from coordinator.db import libpq_url
    from coordinator.settings import normalize_url

    server_url = normalize_url(server_url)
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    ensure(server_url, name)  # type: ignore[operator]
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def _copy_of_template(server_url: str, template: str, candidates: int,
                      upgrade: Any) -> str:
    """A fresh 'pairfarm_sim' copied from database ``template``, which is made, migrated
    and filled with ``candidates`` first when it does not exist; ``SystemExit`` when it
    holds another number of candidates."""
    import psycopg
    from psycopg import sql

    from coordinator.db import libpq_url
    from coordinator.settings import normalize_url

    server_url = normalize_url(server_url)
    base = server_url.rsplit("/", 1)[0]
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              [template]).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    if exists is None:
        upgrade(f"{base}/{template}")
        engine = sa.create_engine(f"{base}/{template}")
        try:
            fill(engine, candidates)
        finally:
            engine.dispose()
    with psycopg.connect(libpq_url(f"{base}/{template}")) as conn:
        held = int(conn.execute("SELECT count(*) FROM candidates").fetchone()[0])  # type: ignore[index]
    if held != candidates:
        raise SystemExit(f"template {template!r} holds {held:,} candidates, not "
                         f"{candidates:,}: drop it or name another")
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pairfarm_sim WITH (FORCE)")
        # FILE_COPY: the files copied after a checkpoint, not every block through the
        # WAL (the default WAL_LOG strategy writes the whole template, ~27 GB at 60M, again)
        conn.execute(sql.SQL("CREATE DATABASE pairfarm_sim TEMPLATE {} STRATEGY = FILE_COPY"
                             ).format(sql.Identifier(template)))
    return f"{base}/pairfarm_sim"


def _postmaster_pid(server_url: str) -> int:
    """The postmaster's PID, when the server runs on this machine (else CPU is not read)."""
    import psycopg

    from coordinator.db import libpq_url
    from coordinator.settings import normalize_url

    with psycopg.connect(libpq_url(normalize_url(server_url))) as conn:
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        # the backend's parent, read while the backend (this connection) still lives
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid).parent()
            if parent is not None:
                return parent.pid
    return pid


if __name__ == "__main__":
    sys.exit(main())
