"""The local farm's parts: the supervisor (real child processes), the finish rule, the
demo's plan and server (real HTTP on loopback)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from coordinator.errors import SettingsError
from coordinator.settings import auto_batch_size
from localfarm.children import Child, Supervisor
from localfarm.cli import stop_report
from localfarm.demo_server import EXPECTED, KINDS, AnswerGate, DemoPlan, DemoServer, bomb_png
from localfarm.errors import FarmBusy
from localfarm.lock import FarmLock
from localfarm.progress import is_finished
from localfarm.stopping import Shutdown
from localfarm.up import UpSettings, _Database, coordinator_child, farm_batch_size
from pairfarm.protocol import FailReport, FarmStats
from tests.conftest import insert_candidates
from tests.leasing import engine_for, leases, new_worker


def _stats(unbatched: int = 0, **batches: int) -> FarmStats:
    return FarmStats(candidates_total=10, candidates_pending=0, batches=batches, outcomes={},
                     bytes_downloaded=0, kept=0, dropped=0, workers_alive=0,
                     candidates_unbatched=unbatched)


def test_finished_only_when_nothing_waits() -> None:
    assert is_finished(_stats(downloaded=3, failed=1), postprocess=False)
    assert not is_finished(_stats(unbatched=1, downloaded=3), postprocess=False)
    assert not is_finished(_stats(leased=1), postprocess=False)
    assert not is_finished(_stats(pending=1), postprocess=False)
    assert not is_finished(_stats(downloaded=3), postprocess=True)
    assert not is_finished(_stats(postprocessing=1, done=2), postprocess=True)
    assert is_finished(_stats(done=3, failed=1), postprocess=True)


def _sleeper(tmp_path: Path, name: str, seconds: float) -> Child:
    argv = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
    return Child(name, argv, {}, tmp_path / f"{name}.log")


def test_supervisor_restarts_a_dead_child_and_records_pids(tmp_path: Path) -> None:
    sup = Supervisor(run_file=tmp_path / "run.json")
    child = sup.add(_sleeper(tmp_path, "a", 60))
    first = child.pid
    assert json.loads((tmp_path / "run.json").read_text())["children"] == {"a": first}
    child.signal(signal.SIGKILL)
    child.wait(10)
    assert sup.revive() == ["a"]
    assert child.pid != first and child.running() and sup.restarts == 1
    assert json.loads((tmp_path / "run.json").read_text())["children"] == {"a": child.pid}
    sup.stop(grace=5)
    assert not child.running()
    assert sup.revive() == [], "a stopped child stays stopped"


def test_supervisor_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    child = Child("stubborn", [sys.executable, "-c", code], {}, tmp_path / "s.log")
    sup = Supervisor(run_file=tmp_path / "run.json")
    sup.add(child)
    while "ready" not in (tmp_path / "s.log").read_text():
        time.sleep(0.05)
    sup.stop(grace=0.5)
    assert child.exit_code() == -signal.SIGKILL


def _wait_log(path: Path, text: str) -> None:
    while text not in (path.read_text() if path.exists() else ""):
        time.sleep(0.05)


# A worker's signal contract: the first SIGTERM drains (keeps running here), the second
# makes it exit.
TWO_SIGNALS = ("import signal, sys, time\n"
               "seen = []\n"
               "def on_term(n, f):\n"
               "    seen.append(n); print('term', len(seen), flush=True)\n"
               "    if len(seen) == 2: sys.exit(0)\n"
               "signal.signal(signal.SIGTERM, on_term)\n"
               "print('ready', flush=True)\n"
               "while True: time.sleep(0.05)\n")


def test_staged_stop_sends_the_second_signal_after_the_first_stage(tmp_path: Path) -> None:
    child = Child("w", [sys.executable, "-c", TWO_SIGNALS], {}, tmp_path / "w.log")
    sup = Supervisor(run_file=tmp_path / "run.json")
    sup.add(child)
    _wait_log(child.log_path, "ready")
    killed = sup.stop(stages=((signal.SIGTERM, 0.5), (signal.SIGTERM, 60)))
    assert killed == [] and child.exit_code() == 0
    assert "term 2" in child.log_path.read_text()


def test_another_stop_request_ends_the_stage_in_progress(tmp_path: Path) -> None:
    child = Child("w", [sys.executable, "-c", TWO_SIGNALS], {}, tmp_path / "w.log")
    sup = Supervisor(run_file=tmp_path / "run.json")
    sup.add(child)
    _wait_log(child.log_path, "ready")
    presses = itertools.count()  # every look finds one more Ctrl-C
    result: list[list[str]] = []
    stopper = threading.Thread(target=lambda: result.append(sup.stop(
        stages=((signal.SIGTERM, 600), (signal.SIGTERM, 600)),
        hurried=lambda: next(presses))))
    stopper.start()
    stopper.join(120)
    assert not stopper.is_alive(), "the 600 s stages were cut short"
    assert result == [[]] and child.exit_code() == 0


def test_farm_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with FarmLock(tmp_path) as lock:
        lock.record("http://127.0.0.1:8611")
        with pytest.raises(FarmBusy) as refused, FarmLock(tmp_path):
            pass
    message = str(refused.value)
    assert f"pid {os.getpid()}, coordinator http://127.0.0.1:8611" in message
    assert str(tmp_path.resolve()) in message and "nothing was started" in message
    with FarmLock(tmp_path):  # given back on exit
        pass


def test_farm_lock_goes_with_a_killed_holder(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from localfarm.lock import FarmLock\n"
            "with FarmLock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(FarmBusy, match=f"pid {holder.pid}"), FarmLock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    with FarmLock(tmp_path):  # kill -9 released it; the stale file does not block
        pass


def test_stop_report_claims_only_what_the_stats_show() -> None:
    released = Shutdown()
    released.account(_stats(leased=3, downloaded=2), _stats(pending=2, downloaded=3))
    assert stop_report(released, 120) == (
        "every batch in hand was finished or released (1 finished, 2 released)")

    killed = Shutdown(killed=["worker-2"])
    killed.account(_stats(leased=2), _stats(leased=1, downloaded=1))
    report = stop_report(killed, 120)
    assert "finished or released" not in report
    assert report == ("2 batches in hand: 1 finished, 0 released; 1 still leased, leased "
                      "again when the lease expires (120 s); killed (did not stop in time): "
                      "worker-2")

    unknown = Shutdown(stats_error="the coordinator did not answer: refused")
    assert "finished or released" not in stop_report(unknown, 30)
    assert "unknown (the coordinator did not answer: refused)" in stop_report(unknown, 30)


def test_gate_holds_requests_until_allowed_or_opened() -> None:
    gate = AnswerGate(is_open=False)
    server = DemoServer(DemoPlan(seed=2), hosts=1, delay=(0, 0), gate=gate).start()
    answers: list[int] = []

    def get(n: int) -> None:
        try:
            answers.append(httpx.get(server.url(n), timeout=60).status_code)
        except httpx.TransportError:  # the plan's "reset" kind
            answers.append(0)

    threads = [threading.Thread(target=get, args=(n,)) for n in range(3)]
    try:
        for t in threads:
            t.start()
        while gate.waiting < 3:
            time.sleep(0.01)
        assert answers == [] and gate.passed == 0
        gate.allow(1)
        while len(answers) < 1:
            time.sleep(0.01)
        assert gate.waiting == 2 and gate.passed == 1 and gate.allowance == 0
        gate.open()
        for t in threads:
            t.join(60)
        assert len(answers) == 3 and gate.passed == 3
        assert gate.requested == Counter({0: 1, 1: 1, 2: 1})
    finally:
        server.stop()


def test_demo_plan_is_deterministic_and_mixed() -> None:
    plan = DemoPlan(seed=3)
    items = [plan.item(n) for n in range(3000)]
    assert items == [DemoPlan(seed=3).item(n) for n in range(3000)]
    assert plan.picture(5) == DemoPlan(seed=3).picture(5)
    counts = Counter(i.kind for i in items)
    for name, share, _ in KINDS:
        assert abs(counts[name] / 3000 - share) < 0.03, name
    assert all(len(i.caption) >= 5 for i in items)


def test_demo_server_does_what_the_plan_says() -> None:
    plan = DemoPlan(seed=1)
    server = DemoServer(plan, hosts=3, delay=(0, 0)).start()
    try:
        seen: dict[str, httpx.Response | None] = {}
        n = 0
        while len(seen) < len(KINDS):
            kind = plan.item(n).kind
            if kind not in seen:
                try:
                    seen[kind] = httpx.get(server.url(n), timeout=5)
                except httpx.TransportError:
                    seen[kind] = None
            n += 1
    finally:
        server.stop()
    assert seen["reset"] is None
    ok = [r for k, r in seen.items() if r is not None and EXPECTED[k].value == "ok"]
    assert all(r.status_code == 200 and r.content[:2] == b"\xff\xd8" and
               len(r.content) > 5 * 1024 for r in ok)
    assert seen["not_found"] is not None and seen["not_found"].status_code == 404
    assert seen["error"] is not None and seen["error"].status_code == 500
    assert seen["opt_out"] is not None and "noai" in seen["opt_out"].headers["x-robots-tag"]
    assert seen["tiny"] is not None and len(seen["tiny"].content) < 5 * 1024
    assert seen["bomb"] is not None and seen["bomb"].content == bomb_png()
    assert len(bomb_png()) > 5 * 1024


@pytest.mark.parametrize("hosts", [1, 4])
def test_demo_urls_spread_over_hosts(hosts: int) -> None:
    server = DemoServer(DemoPlan(), hosts=hosts)
    try:
        assert len({httpx.URL(server.url(n)).host for n in range(100)}) == hosts
    finally:
        for s in server.servers:
            s.server_close()


# -- batch size sized to the input (`pairfarm up` without --batch-size) -------------------

def test_auto_batch_size_gives_each_worker_several_batches() -> None:
    assert auto_batch_size(10_000, 2) == 1_250  # 8 batches, not one 10k batch for 1 worker
    assert auto_batch_size(10_001, 2) == 1_251  # rounded up: never a 9th tiny batch
    assert auto_batch_size(100_000, 2) == 10_000  # a large input keeps the default
    assert auto_batch_size(4_000_000, 64) == 10_000
    assert auto_batch_size(300, 2) == 100  # the floor
    assert auto_batch_size(0, 1) == 100
    assert auto_batch_size(10_000, 2, per_worker=2, smallest=10, largest=20_000) == 2_500
    with pytest.raises(SettingsError):
        auto_batch_size(10_000, 0)


def _lease_all(engine: sa.Engine, size: int, workers: list[int]) -> list[tuple[int, int]]:
    """Lease until nothing is left, the workers in turn: (worker, batch size) each."""
    service = leases(engine, batch_size=size)
    got: list[tuple[int, int]] = []
    for worker in itertools.cycle(workers):
        lease = service.lease_download(worker)
        if lease is None:
            return got
        got.append((worker, len(lease.candidates)))
    raise AssertionError("unreachable")


def test_up_sizes_batches_to_the_input_and_the_workers(db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 1_000)
    settings = UpSettings(inputs=(), out=tmp_path, workers=2)
    size = farm_batch_size(settings, db_url)
    assert size == 125
    argv = coordinator_child(settings, _Database(url=db_url), 8600, size).argv
    assert argv[argv.index("--batch-size") + 1] == "125"
    with engine_for(db_url) as engine:
        workers = [new_worker(engine, "w1"), new_worker(engine, "w2")]
        batches = _lease_all(engine, size, workers)
    assert [n for _, n in batches] == [125] * 8
    assert Counter(w for w, _ in batches) == {workers[0]: 4, workers[1]: 4}


def test_up_honours_an_explicit_batch_size(db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 1_000)
    for explicit in (7, 1_000, 10_000):
        settings = UpSettings(inputs=(), out=tmp_path, workers=2, batch_size=explicit)
        assert farm_batch_size(settings, db_url) == explicit
    with engine_for(db_url) as engine:
        batches = _lease_all(engine, 1_000, [new_worker(engine, "w1")])
    assert [n for _, n in batches] == [1_000]


def test_up_never_sizes_below_a_batch_still_waiting(db_url: str, tmp_path: Path) -> None:
    """A rerun after a run with bigger batches: a released 600 batch must still lease."""
    insert_candidates(db_url, 1_000)
    with engine_for(db_url) as engine:
        worker = new_worker(engine, "w1")
        lease = leases(engine, batch_size=600).lease_download(worker)
        assert lease is not None
        settings = UpSettings(inputs=(), out=tmp_path, workers=2)
        size = farm_batch_size(settings, db_url)
        assert size == 600  # auto alone says 125, which would never re-lease it
        leases(engine).fail("download", lease.batch_id, worker, FailReport(
            lease_token=lease.lease_token, reason="stopped", release=True))
        again = leases(engine, batch_size=size).lease_download(worker)
        assert again is not None and again.batch_id == lease.batch_id


def test_a_failed_ingest_stops_the_coordinator_started_during_it(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --batch-size given the coordinator starts before the ingest; an ingest that
    fails raises StartupFailed and leaves no child running, and no worker was started."""
    from localfarm import up as up_module
    from localfarm.errors import StartupFailed

    started: list[Supervisor] = []

    class Recorded(Supervisor):
        def __init__(self, run_file: Path) -> None:
            super().__init__(run_file=run_file)
            started.append(self)

    monkeypatch.setattr(up_module, "Supervisor", Recorded)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")
    settings = UpSettings(inputs=(broken,), out=tmp_path / "farm", workers=2,
                          database_url=db_url, port=0, batch_size=100, progress=False,
                          stop_grace_s=10)
    with pytest.raises(StartupFailed, match="ingest failed"):
        up_module.run_farm(settings)
    [supervisor] = started
    assert [c.name for c in supervisor.children] == ["coordinator"]
    coordinator = supervisor.children[0]
    assert coordinator.proc is not None and not coordinator.running()
