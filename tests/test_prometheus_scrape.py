"""A real Prometheus server scrapes a real coordinator and a real download worker.

A local image server answers ``/img/<n>.jpg`` with a JPEG, or 404 when ``n % 5 == 3``; 30
candidates are ingested with ``pairfarm ingest``, the coordinator serves batches of 10, one
``pairfarm worker --metrics-port`` downloads them all. Prometheus (Debian's ``prometheus``
package, ``/usr/bin/prometheus``) runs with deploy/prometheus/prometheus.yml's jobs pointed
at 127.0.0.1 and a 1 s scrape interval. Once the farm is idle, what Prometheus stored must
equal the coordinator's ``/api/v1/stats``, and every expression of the Grafana dashboard
must be accepted by Prometheus's PromQL engine (the main ones with data).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pairfarm.client import CoordinatorClient
from pairfarm.protocol import FarmStats
from tests import hostile_server as hs
from tests.conftest import (
    REPO,
    RunningCoordinator,
    cli_env,
    free_port,
    run_cli,
    start_coordinator,
)
from tests.test_grafana_dashboard import PROMETHEUS_YML, load_dashboard, panel_expressions

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None)
COUNT = 30
JPEG = hs.jpeg_bytes(160, 120, seed=3)
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no Prometheus server: install Debian's `prometheus` package "
    "(.ci/run does) to run the real scrape test")


# -- the processes ------------------------------------------------------------------------

class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/robots.txt":  # none (404): the worker may fetch everything
            n, status, body = 0, 404, b"none"
        else:
            n = int(self.path.rsplit("/", 1)[-1].split(".", 1)[0])
            status, body = (404, b"gone") if n % 5 == 3 else (200, JPEG)
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` with output to ``log``; stopped by its PID (SIGTERM, then SIGKILL)."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def coordinator_on(db_url: str, log: Path) -> Iterator[RunningCoordinator]:
    running = start_coordinator(db_url, log, "--batch-size", "10")
    try:
        yield running
    finally:
        running.stop()


def worker_args(coordinator: RunningCoordinator, token: str, out: Path,
                metrics_port: int) -> list[str]:
    return [sys.executable, "-m", "pairfarm", "worker", "--coordinator", coordinator.url,
            "--token", token, "-o", str(out), "--allow-cidr", "127.0.0.0/8",
            "--idle-poll", "1", "--no-progress", "--image-size", "64",
            "--decode-threads", "1", "--metrics-port", str(metrics_port),
            "--metrics-host", "127.0.0.1"]


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with each job in ``ports`` pointed at 127.0.0.1
    (the other jobs dropped) and a 1 s scrape interval."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s",
                            evaluation_interval="1s")
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in ports:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def prometheus_args(config: Path, data: Path, port: int) -> list[str]:
    assert PROMETHEUS is not None
    return [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}"]


# -- asking -----------------------------------------------------------------------------

def query(prometheus: str, expr: str) -> list[tuple[dict[str, str], float]]:
    """An instant query: ``(labels, value)`` per series; raises on a PromQL error."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr!r}: {exc.read().decode(errors='replace')}") from exc
    assert answer["status"] == "success", answer
    return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]


def by_label(prometheus: str, expr: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in query(prometheus, expr)}


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str,
         logs: tuple[Path, ...]) -> T:
    """Call ``read`` until ``done`` holds for its value (these wait on other processes)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = read()
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if done(value):
                return value
            last = value
        time.sleep(0.25)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                      for log in logs if log.exists())
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}\n{tails}")


def nonzero(counts: dict[str, int] | dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in counts.items() if v}


def farm_idle(stats: FarmStats) -> bool:
    busy = {state for state, count in stats.batches.items() if count}
    return stats.candidates_pending == 0 and busy == {"downloaded"}


def ingest(coordinator: RunningCoordinator, images: str, path: Path) -> None:
    urls = [f"{images}/img/{n}.jpg" for n in range(COUNT)]
    pq.write_table(pa.table({"url": urls, "caption": [f"picture {n}" for n in range(COUNT)]}),
                   path)
    run_cli("ingest", str(path), env=coordinator.env())


# -- the test -----------------------------------------------------------------------------

def test_prometheus_scrapes_the_coordinator_and_a_worker(db_url: str, tmp_path: Path) -> None:
    logs = tuple(tmp_path / f"{n}.log" for n in ("coordinator", "worker", "prometheus"))
    with ExitStack() as stack:
        images = stack.enter_context(image_server())
        coordinator = stack.enter_context(coordinator_on(db_url, logs[0]))
        ingest(coordinator, images, tmp_path / "urls.parquet")
        admin = stack.enter_context(CoordinatorClient(coordinator.url,
                                                      coordinator.token("admin")))
        worker_port = free_port()
        stack.enter_context(process(worker_args(coordinator, coordinator.token("worker"),
                                                tmp_path / "shards", worker_port), logs[1]))
        config = tmp_path / "prometheus.yml"
        coordinator_port = int(coordinator.url.rsplit(":", 1)[1])
        config.write_text(yaml.safe_dump(prometheus_config(
            {"coordinator": coordinator_port, "worker": worker_port})))
        prom_port = free_port()
        stack.enter_context(process(prometheus_args(config, tmp_path / "tsdb", prom_port),
                                    logs[2]))
        prometheus = f"http://127.0.0.1:{prom_port}"

        stats = poll(admin.stats, farm_idle, 120, "the worker to download every batch", logs)
        check_coordinator_series(prometheus, stats, logs)
        check_worker_series(prometheus, stats, logs)
        check_dashboard_queries(prometheus, logs)


def check_coordinator_series(prometheus: str, stats: FarmStats, logs: tuple[Path, ...]
                             ) -> None:
    batches = poll(lambda: by_label(prometheus, "pairfarm_batches", "state"),
                   lambda got: nonzero(got) == nonzero(stats.batches), 60,
                   "Prometheus to store pairfarm_batches as /api/v1/stats has it", logs)
    assert set(batches) >= set(stats.batches)
    assert nonzero(by_label(prometheus, "pairfarm_candidates", "state")) == \
        nonzero(stats.candidates_by_status)
    assert nonzero(by_label(prometheus, "pairfarm_url_outcomes_total", "outcome")) == \
        nonzero(stats.outcomes)
    assert sum(stats.outcomes.values()) == COUNT
    (_, sent), = query(prometheus, "pairfarm_downloaded_bytes_total")
    assert sent == stats.bytes_downloaded > 0
    alive = by_label(prometheus, "pairfarm_workers_alive", "role")
    assert sum(alive.values()) == stats.workers_alive >= 1


def check_worker_series(prometheus: str, stats: FarmStats, logs: tuple[Path, ...]) -> None:
    outcomes = poll(lambda: by_label(prometheus, "pairfarm_worker_url_outcomes_total",
                                     "outcome"),
                    lambda got: nonzero(got) == nonzero(stats.outcomes), 60,
                    "the worker's outcome counters to match the coordinator's", logs)
    assert outcomes["ok"] == COUNT - COUNT // 5
    assert by_label(prometheus, "pairfarm_worker_batches_total", "result")["completed"] == \
        stats.batches["downloaded"]
    (_, rss), = query(prometheus, 'process_resident_memory_bytes{job="worker"}')
    assert rss > 10_000_000
    (_, fetched), = query(prometheus, "pairfarm_worker_fetch_duration_seconds_count")
    assert fetched == COUNT
    (_, in_flight), = query(prometheus, "pairfarm_worker_requests_in_flight")
    assert in_flight == 0


# Panels whose queries must have data once a worker has downloaded a few batches (rates
# need two samples in the window; the rest may be empty without post-processing, lease
# expiries or fencing rejections).
PANELS_WITH_DATA = ("Candidates by state", "Done fraction", "Workers alive",
                    "Batches by state", "Download throughput (URLs/s by outcome)",
                    "Outcome breakdown", "Requests in flight", "Fetch time p50 / p95",
                    "Worker RSS", "Worker outcomes (URLs/s)")


def check_dashboard_queries(prometheus: str, logs: tuple[Path, ...]) -> None:
    expressions = panel_expressions(load_dashboard())
    for _, expr in expressions:
        query(prometheus, expr)  # raises on a PromQL parse or evaluation error
    wanted = [(t, e) for t, e in expressions if t in PANELS_WITH_DATA]
    assert {t for t, _ in wanted} == set(PANELS_WITH_DATA)
    poll(lambda: [(t, e) for t, e in wanted if not query(prometheus, e)], lambda empty: not empty,
         30, "the dashboard's main panels to have data", logs)
