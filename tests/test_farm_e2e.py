"""End to end: `pairfarm up` / `pairfarm demo` in subprocesses, with fault drills.

Each drill runs a real farm (embedded PostgreSQL, coordinator, worker processes) against
the demo image server on loopback, breaks something mid-run, and then checks the dataset:
every candidate URL appears exactly once across the shards' parquet files, with the
outcome the server's plan says it must have.

The farm moves only as far as the test lets it: the server's ``AnswerGate`` holds every
request until the test opens it or lets a counted number of answers through (``pump``),
so a fault lands while batches are in flight on a fast machine as on a slow one. The
workers' read timeout and deadline are long enough for a held request not to time out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest

from coordinator.embedded_pg import EmbeddedPostgres, read_running
from localfarm.demo import check_dataset, write_candidates
from localfarm.demo_server import AnswerGate, DemoPlan, DemoServer
from pairfarm.client import ClientError, CoordinatorClient
from pairfarm.protocol import FarmStats
from tests.conftest import REPO, cli_env, run_cli

#: 15 batches: 4 in hand (2 a worker) and batches left over even after 10 finished (a
#: lease-ahead is refused when it would take the last batch); ``pump`` overshoots: it lets
#: answers through while a finished batch's shard is written and reported (4 batches
#: were downloaded when it stopped on a loaded 2-core machine)
COUNT = 600
#: 8 batches: 4 in hand, for tests that leave the gate closed until they stop the farm
SMALL = 320
BATCH = 40
HELD = ["--worker-arg=--read-timeout=600", "--worker-arg=--deadline=600"]
STOP_LINE = re.compile(r"every batch in hand was finished or released "
                       r"\((\d+) finished, (\d+) released\)")


@pytest.fixture
def farm_dir() -> Iterator[Path]:
    """A farm directory outside pytest's basetemp: PostgreSQL runs as another user there,
    and a concurrently starting pytest resets basetemp's parents to mode 0700."""
    root = Path(tempfile.mkdtemp(prefix="pairfarm-farm-"))
    yield root / "farm"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[DemoServer]:
    """The demo plan on 4 hosts, behind a closed gate: nothing is answered until the test
    says so."""
    server = DemoServer(DemoPlan(seed=11), hosts=4, delay=(0.01, 0.05),
                        gate=AnswerGate(is_open=False)).start()
    yield server
    server.stop()


@pytest.fixture
def up_procs(server: DemoServer) -> Iterator[list[subprocess.Popen[str]]]:
    """`pairfarm up` processes a test started: stopped (gate open, so that their workers
    finish at once) and their pipes closed at teardown, also when the test failed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    server.gate.open()
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def up_argv(out: Path, candidates: Path, *extra: str, per_host: int = 2) -> list[str]:
    return [sys.executable, "-m", "pairfarm", "up", "--input", str(candidates),
            "--out", str(out), "--workers", "2", "--batch-size", str(BATCH),
            "--lease-ttl", "4", "--port", "0", "--no-progress",
            "--worker-arg=--allow-cidr=127.0.0.0/8", f"--worker-arg=--per-host={per_host}",
            "--worker-arg=--backoff-cap=1", *HELD, *extra]


def start_up(procs: list[subprocess.Popen[str]], out: Path, candidates: Path, *extra: str,
             per_host: int = 2, new_session: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen(up_argv(out, candidates, *extra, per_host=per_host),
                            env=cli_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
    procs.append(proc)
    return proc


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[str],
             timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"pairfarm up exited ({proc.returncode}) while waiting for "
                                 f"{what}:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def crash_postgres(datadir: Path, proc: subprocess.Popen[str]) -> None:
    """An immediate shutdown (SIGQUIT to the postmaster), waited for by the postmaster's PID:
    ``pg_ctl stop -w`` would wait 60 s when ``up`` starts a new server before it looks."""
    running = read_running(datadir)
    assert running is not None, "PostgreSQL runs"
    os.kill(running.pid, signal.SIGQUIT)
    wait_for("the old postmaster to exit", lambda: (
        (now := read_running(datadir)) is None or now.pid != running.pid), proc, timeout=60)


def pump(gate: AnswerGate, what: str, check: Callable[[], bool],
         proc: subprocess.Popen[str], step: int = 8) -> None:
    """Let answers through ``step`` at a time until ``check()`` holds, then close the gate:
    the farm gets no further than the answers let through. ``check()`` sees a batch only
    once its shard is written and reported, and answers go on passing meanwhile: more
    may have finished than it asked for."""
    while not check():
        if gate.allowance == 0:
            gate.allow(step)
        wait_for(what, lambda: check() or gate.allowance == 0, proc)
    gate.close()


class Farm:
    """What a test can see of a running `pairfarm up`: its files and its API."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def ready(self) -> bool:
        run = self.out / "run.json"
        # up records each child as it starts it: ready once both workers are recorded
        return run.exists() and (self.out / "tokens.json").exists() and \
            {"worker-1", "worker-2"} <= json.loads(run.read_text())["children"].keys()

    def children(self) -> dict[str, int]:
        return {k: int(v) for k, v in
                json.loads((self.out / "run.json").read_text())["children"].items()}

    def pid(self, name: str) -> int:
        return self.children()[name]

    def url(self) -> str:
        port = json.loads((self.out / "farm.json").read_text())["coordinator_port"]
        return f"http://127.0.0.1:{port}"

    def stats(self) -> FarmStats | None:
        admin = json.loads((self.out / "tokens.json").read_text())["admin"]
        try:
            with CoordinatorClient(self.url(), admin) as client:
                return client.stats()
        except ClientError:
            return None

    def holds_batch(self, worker: str, count: int = 1) -> bool:
        """``worker`` holds ``count`` batches or more (2: one leased ahead)."""
        stats = self.stats()
        return stats is not None and any(w.name == worker and len(w.batches) >= count
                                         for w in stats.workers)

    def downloaded_batches(self) -> int:
        stats = self.stats()
        return 0 if stats is None else stats.batches.get("downloaded", 0)

    def log(self, name: str) -> str:
        path = self.out / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def batch_statuses(self) -> Counter[str]:
        """The batches table by status, read from the farm's database once `up` exited."""
        pg = EmbeddedPostgres(self.out / "pg")
        port = json.loads((self.out / "farm.json").read_text())["pg_port"]
        server = pg.start(port=port)
        try:
            url = server.url("pairfarm").replace("postgresql+psycopg", "postgresql")
            with psycopg.connect(url) as conn:
                rows = conn.execute("SELECT status, count(*) FROM batches GROUP BY status")
                return Counter({status: count for status, count in rows})
        finally:
            pg.stop()

    def shard_urls(self) -> set[int]:
        """URL numbers in the shards written so far (completed batches only)."""
        numbers: set[int] = set()
        for path in (self.out / "shards").glob("*.parquet"):
            for url in pq.read_table(path, columns=["url"]).column("url").to_pylist():
                numbers.add(int(url.rsplit("/", 1)[-1].split(".")[0]))
        return numbers


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        raise AssertionError(f"pairfarm up did not finish:\n{out}") from None
    assert proc.returncode == 0, out
    return out


def assert_complete(out: Path, count: int) -> None:
    check = check_dataset(out)
    assert check.rows == count, "every candidate has exactly one row"
    assert check.urls == count, "no URL appears twice"
    assert check.mismatched == [], "every URL ended in the outcome the server planned"
    stats_files = sorted((out / "shards").glob("*_stats.json"))
    assert sum(json.loads(f.read_text())["count"] for f in stats_files) == count


def stop_counts(output: str) -> tuple[int, int]:
    """(finished, released) from `up`'s stop message; fails if it does not claim both."""
    found = STOP_LINE.search(output)
    assert found is not None, output
    return int(found.group(1)), int(found.group(2))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_worker_restart_coordinator_and_postgres_mid_run(
        tmp_path: Path, farm_dir: Path, server: DemoServer,
        up_procs: list[subprocess.Popen[str]]) -> None:
    candidates = write_candidates(server, COUNT, tmp_path / "candidates.parquet")
    out, gate = farm_dir, server.gate
    proc = start_up(up_procs, out, candidates, per_host=1)
    farm = Farm(out)
    wait_for("the farm to start", farm.ready, proc)

    wait_for("worker-1 to hold a batch", lambda: farm.holds_batch("up-worker-1"), proc)
    os.kill(farm.pid("worker-1"), signal.SIGKILL)

    pump(gate, "two downloaded batches", lambda: farm.downloaded_batches() >= 2, proc)
    os.kill(farm.pid("coordinator"), signal.SIGKILL)

    wait_for("the coordinator to be back", lambda: farm.stats() is not None, proc)
    before = farm.downloaded_batches()
    # a batch needs one answer per URL: the gate bounds how far the farm got
    assert before <= gate.passed // BATCH < COUNT // BATCH, "batches are left to download"
    crash_postgres(out / "pg", proc)
    pump(gate, "progress after the database restart",
         lambda: farm.downloaded_batches() > before, proc)

    gate.open()
    output = finish(proc)
    assert "restarts:" in output  # the worker and the coordinator were brought back
    assert "killed:" not in output, "every child stopped when asked"
    assert_complete(out, COUNT)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_releases_the_batches_in_hand_then_rerun_resumes(
        tmp_path: Path, farm_dir: Path, server: DemoServer,
        up_procs: list[subprocess.Popen[str]], signum: int) -> None:
    candidates = write_candidates(server, COUNT, tmp_path / "candidates.parquet")
    out, gate = farm_dir, server.gate
    proc = start_up(up_procs, out, candidates, "--drain-timeout", "1")
    farm = Farm(out)
    wait_for("the farm to start", farm.ready, proc)
    pump(gate, "a downloaded batch", lambda: farm.downloaded_batches() >= 1, proc)
    # lease-ahead: a 40-candidate batch is all tail, so each worker holds 2 of those left
    wait_for("both workers to hold 2 batches", lambda: farm.holds_batch("up-worker-1", 2)
             and farm.holds_batch("up-worker-2", 2), proc)

    # the gate stays closed: the batches in hand cannot finish, so they must be released
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, output
    assert "Run the same command again to resume" in output
    assert "killed" not in output, output
    finished, released = stop_counts(output)
    assert finished + released == 4 and released >= 1, output
    assert not (out / "run.json").exists(), "every child was stopped"
    statuses = farm.batch_statuses()
    assert statuses["leased"] == 0, statuses
    assert statuses["downloaded"] == len(list((out / "shards").glob("*_stats.json"))) >= 1
    first_run = farm.shard_urls()

    gate.requested.clear()
    gate.open()
    rerun = start_up(up_procs, out, candidates)
    output = finish(rerun)
    assert "inserted 0" in output, "the rerun ingests nothing new"
    assert_complete(out, COUNT)
    again = sorted(n for n in first_run if gate.requested[n])
    assert again == [], "the rerun downloads no URL of a batch finished before Ctrl-C"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_on_the_process_group_lets_workers_finish_their_batches(
        tmp_path: Path, farm_dir: Path, server: DemoServer,
        up_procs: list[subprocess.Popen[str]]) -> None:
    """A terminal's Ctrl-C reaches the whole foreground process group: only `up` may act
    on it; the workers get SIGTERM from `up` while the coordinator and PostgreSQL still
    take their reports."""
    candidates = write_candidates(server, SMALL, tmp_path / "candidates.parquet")
    out, gate = farm_dir, server.gate
    proc = start_up(up_procs, out, candidates, new_session=True)
    farm = Farm(out)
    wait_for("the farm to start", farm.ready, proc)
    wait_for("both workers to hold 2 batches (one leased ahead)",
             lambda: farm.holds_batch("up-worker-1", 2) and farm.holds_batch("up-worker-2", 2),
             proc)

    os.killpg(proc.pid, signal.SIGINT)
    wait_for("both workers to be told to finish", lambda: all(
        "got SIGTERM" in farm.log(w) for w in ("worker-1", "worker-2")), proc)
    gate.open()
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, output
    assert stop_counts(output) == (4, 0), output  # both started: finished, none released
    assert "killed" not in output, output
    assert not any("got SIGINT" in farm.log(w) for w in ("worker-1", "worker-2"))
    statuses = farm.batch_statuses()
    assert statuses["leased"] == 0 and statuses["downloaded"] == 4, statuses


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_up_on_the_same_out_is_refused(
        tmp_path: Path, farm_dir: Path, server: DemoServer,
        up_procs: list[subprocess.Popen[str]]) -> None:
    candidates = write_candidates(server, SMALL, tmp_path / "candidates.parquet")
    out, gate = farm_dir, server.gate
    first = start_up(up_procs, out, candidates)
    farm = Farm(out)
    wait_for("the farm to start", farm.ready, first)
    children, logs = farm.children(), sorted((out / "logs").iterdir())

    second = start_up(up_procs, out, candidates)
    output, _ = second.communicate(timeout=120)
    assert second.returncode != 0, output
    assert f"another `pairfarm up` is running on {out.resolve()}" in output, output
    assert f"pid {first.pid}, coordinator {farm.url()}" in output, output
    assert "inserted" not in output, "nothing was ingested"
    assert farm.children() == children and all(_alive(pid) for pid in children.values())
    assert sorted((out / "logs").iterdir()) == logs, "no child was started"
    assert farm.stats() is not None

    gate.open()
    finish(first)
    assert_complete(out, SMALL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_demo_runs_offline_and_filters(farm_dir: Path) -> None:
    result = run_cli("demo", "--out", str(farm_dir), "--count", "300",
                     "--batch-size", "60", "--no-progress", timeout=600)
    assert "300 candidates -> 300 shard rows, 300 distinct URLs" in result.stdout
    assert "ended differently" not in result.stdout
