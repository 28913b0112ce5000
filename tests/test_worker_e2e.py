"""End to end: the real coordinator, two ``pairfarm worker`` processes, a kill -9.

A local image server (four loopback hosts) answers ``/img/<n>.jpg`` after 0.3 s: an
image, or 404 for every n with ``n % 10 == 3`` (the server's truth). 3,000 candidates are
ingested with ``pairfarm ingest``; the coordinator serves batches of 250 with a 6 s
lease. Worker A is killed with SIGKILL while its first batch is in flight; a new worker
takes its place; worker B runs throughout. The batch A held is reaped and re-leased,
and the final output holds every URL exactly once, with the outcome the server decided.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trio

from pairfarm.client import CoordinatorClient
from tests import hostile_server as hs
from tests.conftest import REPO, cli_env, run_cli, start_coordinator

COUNT = 3000
BATCH = 250
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
JPEGS = [hs.jpeg_bytes(200 + 10 * i, 150 + 10 * i, seed=i) for i in range(8)]


async def _image_or_404(stream: trio.SocketStream, request: hs.Request) -> None:
    n = int(request.path.rsplit("/", 1)[-1].split(".", 1)[0])
    await trio.sleep(0.3)
    if n % 10 == 3:
        await hs.respond(stream, 404, b"gone")
    else:
        await hs.respond(stream, 200, JPEGS[n % len(JPEGS)], {"Content-Type": "image/jpeg"})


def _expected(url: str) -> str:
    n = int(url.rsplit("/", 1)[-1].split(".", 1)[0])
    return "http_4xx" if n % 10 == 3 else "ok"


def _start_worker(coordinator_url: str, token: str, out: Path,
                  log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "pairfarm", "-v", "worker", "--coordinator", coordinator_url,
            "--token", token, "-o", str(out), "--allow-cidr", "127.0.0.0/8", "--per-host", "8",
            "--idle-poll", "1", "--no-progress", "--image-size", "64", "--decode-threads", "1"]
    with log.open("wb") as sink:
        return subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=sink,
                                stderr=subprocess.STDOUT)


def _wait_for(predicate: object, timeout: float, what: str, logs: tuple[Path, ...] = ()
              ) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                      for log in logs if log.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def _all_downloaded(admin: CoordinatorClient) -> bool:
    stats = admin.stats()
    busy = {status for status, count in stats.batches.items() if count}
    return stats.candidates_pending == 0 and busy == {"downloaded"}


def _held_batches(log: Path) -> set[int]:
    """Batches the worker logged as leased and not as done."""
    lines = log.read_text(errors="replace").splitlines()
    leased = {int(ln.split("batch ", 1)[1].split(":", 1)[0])
              for ln in lines if "candidates (attempt" in ln}
    done = {int(ln.split("batch ", 1)[1].split(" ", 1)[0]) for ln in lines if " done: " in ln}
    return leased - done


def _first_batch(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if "candidates (attempt" in line:
            return int(line.split("batch ", 1)[1].split(":", 1)[0])
    return None


@pytest.mark.slow
def test_two_workers_a_kill_9_and_every_url_exactly_once(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with ExitStack() as stack:
        servers = [stack.enter_context(hs.server_thread({}, host, _image_or_404))
                   for host in HOSTS]
        urls = [f"http://{HOSTS[n % 4]}:{servers[n % 4].port}/img/{n}.jpg" for n in range(COUNT)]
        listing = tmp_path / "candidates.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"picture {n}" for n in range(COUNT)]}),
                       listing)
        run_cli("ingest", str(listing), env=cli_env(DATABASE_URL=db_url))
        coord = start_coordinator(db_url, tmp_path / "coordinator.log", "--batch-size",
                                  str(BATCH), "--lease-ttl", "6", "--reap-interval", "1")
        stack.callback(coord.stop)
        workers: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: [w.kill() for w in workers if w.poll() is None])
        a_log = tmp_path / "worker-a.log"
        workers.append(_start_worker(coord.url, coord.token("worker", "a"), out, a_log))
        workers.append(_start_worker(coord.url, coord.token("worker", "b"), out,
                                     tmp_path / "worker-b.log"))
        _wait_for(lambda: _first_batch(a_log) is not None, 60, "worker A's first lease")
        killed_batch = _first_batch(a_log)
        os.kill(workers[0].pid, signal.SIGKILL)
        assert workers[0].wait(10) == -signal.SIGKILL
        # its first batch and, leased ahead, maybe a second: the log may miss a lease the
        # coordinator granted just before the kill, the database does not
        held = _held_batches(a_log) | _leased_by(db_url, "a")
        workers.append(_start_worker(coord.url, coord.token("worker", "c"), out,
                                     tmp_path / "worker-c.log"))
        admin = CoordinatorClient(coord.url, coord.token("admin"))
        stack.callback(admin.close)
        _wait_for(lambda: _all_downloaded(admin), 180, "every batch downloaded",
                  tuple(tmp_path.glob("*.log")))
        for worker in workers[1:]:
            worker.send_signal(signal.SIGTERM)
        assert [w.wait(60) for w in workers[1:]] == [0, 0]
        stats = admin.stats()

    _check_output(out, urls, stats.outcomes)
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        attempts = dict(conn.execute("SELECT id, attempts FROM batches").fetchall())
    assert attempts[killed_batch] == 2  # reaped after the kill, leased again
    assert killed_batch in held and len(held) <= 2  # at most 2 batches in hand
    # the batches leased again are the ones A held when their lease expired (one may have
    # completed just before the kill; a lease-ahead A sent before the kill may have been
    # granted after ``held`` was read): the reaper records A as their last holder
    again = {b for b, n in attempts.items() if n == 2}
    assert killed_batch in again and len(again) <= 2
    assert again == _reaped_from(db_url, "a")
    assert sum(attempts.values()) == len(attempts) + len(again)  # every other: one lease


def _reaped_from(db_url: str, token_name: str) -> set[int]:
    """The batches whose last expired lease was held by the worker of ``token_name``
    (the reaper sets ``last_worker_id``; a later lease and completion keep it)."""
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            "SELECT b.id FROM batches b JOIN workers w ON w.id = b.last_worker_id"
            " JOIN tokens t ON t.id = w.token_id WHERE t.name = %s", (token_name,)).fetchall()
    return {row[0] for row in rows}


def _leased_by(db_url: str, token_name: str) -> set[int]:
    """The batches leased to the worker registered with token ``token_name``."""
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            "SELECT b.id FROM batches b JOIN workers w ON w.id = b.worker_id"
            " JOIN tokens t ON t.id = w.token_id WHERE b.status = 'leased' AND t.name = %s",
            (token_name,)).fetchall()
    return {row[0] for row in rows}


def _check_output(out: Path, urls: list[str], outcomes: dict[str, int]) -> None:
    parquets = sorted(p for p in out.glob("*.parquet") if not p.name.startswith("."))
    assert len(parquets) == COUNT // BATCH
    rows = [row for p in parquets for row in pq.read_table(p).to_pylist()]
    seen = Counter(row["url"] for row in rows)
    assert set(seen) == set(urls) and set(seen.values()) == {1}  # every URL exactly once
    for row in rows:
        assert (row["error_class"] or "ok") == _expected(row["url"])
    truth = Counter(_expected(u) for u in urls)
    assert {k: v for k, v in outcomes.items() if v} == dict(truth)  # the coordinator agrees
    for parquet in parquets:
        stem = parquet.stem
        table = pq.read_table(parquet).to_pylist()
        stats = json.loads((out / f"{stem}_stats.json").read_text())
        assert stats["count"] == len(table) == BATCH
        assert stats["successes"] == sum(r["status"] == "success" for r in table)
        with tarfile.open(out / f"{stem}.tar") as tar:
            keys = {name.split(".")[0] for name in tar.getnames()}
        assert keys == {r["key"] for r in table if r["status"] == "success"}
