"""The download worker's Prometheus metrics: the recorder on its own, then real downloads
from the local hostile server, scraped over HTTP and checked against the shard written."""

from __future__ import annotations

import json
import random
import socket
from collections import Counter
from pathlib import Path

import fsspec
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from pairfarm.client import AsyncCoordinatorClient
from pairfarm.outcomes import ALL_OUTCOMES, Outcome
from pairfarm.protocol import Candidate
from tests import hostile_server as hs
from tests.conftest import cli_env, run_cli
from tests.test_worker_runloop import ScriptedCoordinator
from worker.batch import Network, download_batch
from worker.errors import FetchFailure, SettingsError
from worker.metrics import BatchResult, WorkerMetrics, build_metrics, metric_names, serve_metrics
from worker.runloop import RunLoop
from worker.settings import (
    FetchSettings,
    ImageSettings,
    MetricsSettings,
    PipelineSettings,
    RunSettings,
)

JPEGS = [hs.jpeg_bytes(300 + 40 * i, 200 + 30 * i, seed=i) for i in range(4)]
SETTINGS = PipelineSettings(fetch=FetchSettings(deadline=10),
                            image=ImageSettings(image_size=64), decode_threads=2)
ROUTES = {**{f"/img/{i}.jpg": hs.route_ok(data) for i, data in enumerate(JPEGS)},
          "/gone.jpg": hs.route_status(410), "/broken.jpg": hs.route_status(500),
          "/tiny.jpg": hs.route_ok(b"\xff\xd8\xff" + b"\0" * 100),
          "/bomb.png": hs.route_ok(hs.png_bomb_header(), "image/png"),
          "/noai.jpg": hs.route_ok(JPEGS[0], headers={"X-Robots-Tag": "noai"})}
PATHS = ["/img/0.jpg", "/gone.jpg", "/img/1.jpg", "/tiny.jpg", "/broken.jpg", "/img/2.jpg",
         "/bomb.png", "/noai.jpg", "/img/3.jpg", "/img/0.jpg"]
#: outcomes decided after the body was fetched: these went through the decode stage
DECODED = {Outcome.OK.value, Outcome.TOO_SMALL.value, Outcome.BOMB.value}
LOCAL = MetricsSettings(port=0, host="127.0.0.1")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def outcome_counts(samples: Samples) -> dict[str, int]:
    counts = {o: int(value(samples, "pairfarm_worker_url_outcomes_total", outcome=o))
              for o in ALL_OUTCOMES}
    return {o: n for o, n in counts.items() if n}


def sample_of(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, name
    return found


# -- the recorder ------------------------------------------------------------------------


def test_fetches_are_in_flight_and_timed_unless_cancelled() -> None:
    metrics = build_metrics()

    async def main() -> None:
        with metrics.fetching():
            assert sample_of(metrics, "pairfarm_worker_requests_in_flight") == 1
            await trio.sleep(2)
        with pytest.raises(FetchFailure), metrics.fetching():
            await trio.sleep(30)
            raise FetchFailure(Outcome.TIMEOUT, "deadline")
        with trio.move_on_after(1), metrics.fetching():
            await trio.sleep(5)  # cancelled: not a fetch duration

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sample_of(metrics, "pairfarm_worker_requests_in_flight") == 0
    assert sample_of(metrics, "pairfarm_worker_fetch_duration_seconds_count") == 2
    assert sample_of(metrics, "pairfarm_worker_fetch_duration_seconds_sum") == 32
    assert sample_of(metrics, "pairfarm_worker_fetch_duration_seconds_bucket", le="2.5") == 1


def test_outcomes_bytes_decodes_and_batches_are_counted() -> None:
    metrics = build_metrics()
    for outcome in ("ok", "ok", "http_4xx"):
        metrics.outcome(outcome)
    metrics.add_bytes(1000)
    metrics.add_bytes(24)
    with metrics.decoding():
        pass
    metrics.batch(BatchResult.LOST)
    assert sample_of(metrics, "pairfarm_worker_url_outcomes_total", outcome="ok") == 2
    assert sample_of(metrics, "pairfarm_worker_url_outcomes_total", outcome="http_4xx") == 1
    assert sample_of(metrics, "pairfarm_worker_url_outcomes_total", outcome="dns") == 0
    assert sample_of(metrics, "pairfarm_worker_downloaded_bytes_total") == 1024
    assert sample_of(metrics, "pairfarm_worker_decode_duration_seconds_count") == 1
    assert sample_of(metrics, "pairfarm_worker_batches_total", result="lost") == 1
    assert sample_of(metrics, "pairfarm_worker_batches_total", result="completed") == 0


def test_metric_names_are_the_spec_names() -> None:
    names = metric_names()
    assert {"pairfarm_worker_requests_in_flight", "pairfarm_worker_url_outcomes_total",
            "pairfarm_worker_downloaded_bytes_total", "pairfarm_worker_batches_total",
            "pairfarm_worker_fetch_duration_seconds_bucket",
            "pairfarm_worker_fetch_duration_seconds_count",
            "pairfarm_worker_decode_duration_seconds_sum",
            "process_resident_memory_bytes", "python_info"} <= names
    assert "pairfarm_worker_url_outcomes" not in names  # counters only as _total


def test_registries_are_independent() -> None:
    first, second = build_metrics(), build_metrics()
    first.outcome("ok")
    assert sample_of(second, "pairfarm_worker_url_outcomes_total", outcome="ok") == 0


def test_a_busy_port_is_a_settings_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = MetricsSettings(port=busy.getsockname()[1], host="127.0.0.1")
        with pytest.raises(SettingsError, match="cannot serve metrics"), \
                serve_metrics(build_metrics(), taken):
            pass


def test_metrics_flag_zero_is_off_and_ports_are_checked() -> None:
    assert MetricsSettings.from_flag(0, "0.0.0.0").port is None
    assert MetricsSettings.from_flag(9700, "::").port == 9700
    with pytest.raises(SettingsError):
        MetricsSettings(port=70000)


# -- real downloads, scraped -------------------------------------------------------------


def test_a_batch_is_counted_as_its_shard_says(tmp_path: Path) -> None:
    metrics = build_metrics()

    async def main() -> None:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, ROUTES)
            candidates = [Candidate(id=i, url=server.url(p), caption=f"c{i}")
                          for i, p in enumerate(PATHS)]
            prepared = await download_batch(
                3, candidates, settings=SETTINGS, fs=fsspec.filesystem("file"),
                directory=str(tmp_path), network=Network(resolver=dns, dialer=dialer),
                metrics=metrics)
            await prepared.commit()
            nursery.cancel_scope.cancel()

    with serve_metrics(metrics, LOCAL) as port:
        assert port is not None
        trio.run(main)
        samples = scrape(port)
    rows = pq.read_table(tmp_path / "00000003.parquet").to_pylist()
    outcomes = Counter(row["error_class"] or "ok" for row in rows)
    stats = json.loads((tmp_path / "00000003_stats.json").read_text())
    assert outcome_counts(samples) == dict(outcomes)
    assert value(samples, "pairfarm_worker_downloaded_bytes_total") == stats["bytes_downloaded"]
    assert stats["bytes_downloaded"] > sum(len(j) for j in JPEGS)
    assert value(samples, "pairfarm_worker_fetch_duration_seconds_count") == len(rows)
    assert value(samples, "pairfarm_worker_fetch_duration_seconds_bucket", le="+Inf") == len(rows)
    assert value(samples, "pairfarm_worker_decode_duration_seconds_count") == sum(
        n for outcome, n in outcomes.items() if outcome in DECODED)
    assert value(samples, "pairfarm_worker_requests_in_flight") == 0
    assert value(samples, "process_resident_memory_bytes") > 0


def test_the_run_loop_counts_batch_results(tmp_path: Path) -> None:
    coordinator = ScriptedCoordinator(batches=[], heartbeat_s=3, lose_lease_of={1})
    metrics = build_metrics()
    routes = {"/slow.jpg": hs.route_slow_first_byte(8, JPEGS[0]), "/a.jpg": hs.route_ok(JPEGS[1]),
              "/404": hs.route_status(404)}

    async def main() -> None:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, routes)
            coordinator.batches = [[server.url("/slow.jpg")],
                                   [server.url("/a.jpg"), server.url("/404")]]
            settings = RunSettings(coordinator_url="http://coordinator.test", token="secret",
                                   output=str(tmp_path), name="w1", pipeline=SETTINGS,
                                   exit_when_idle=True)
            async with AsyncCoordinatorClient("http://coordinator.test", "secret",
                                              transport=coordinator.transport()) as client:
                loop = RunLoop(settings, client, fsspec.filesystem("file"), str(tmp_path),
                               network=Network(resolver=dns, dialer=dialer),
                               rng=random.Random(0), metrics=metrics)
                await loop.run()
            nursery.cancel_scope.cancel()

    # as in test_worker_runloop: the clock jumps after 0.3 s of real idleness, so that
    # decode and file threads finish before virtual time moves on
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.3))
    assert sample_of(metrics, "pairfarm_worker_batches_total", result="lost") == 1
    assert sample_of(metrics, "pairfarm_worker_batches_total", result="completed") == 1
    assert sample_of(metrics, "pairfarm_worker_batches_total", result="failed") == 0
    assert sample_of(metrics, "pairfarm_worker_url_outcomes_total", outcome="ok") == 1
    assert sample_of(metrics, "pairfarm_worker_url_outcomes_total", outcome="http_4xx") == 1
    # the lost batch's fetch was cancelled: out of flight, not timed
    assert sample_of(metrics, "pairfarm_worker_requests_in_flight") == 0
    assert sample_of(metrics, "pairfarm_worker_fetch_duration_seconds_count") == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_download_command_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    port = _free_port()
    seen: list[str] = []

    async def scrape_then_answer(stream: trio.SocketStream, request: hs.Request) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        seen.append(await trio.to_thread.run_sync(lambda: httpx.get(url, timeout=10).text))
        await hs.respond(stream, 200, JPEGS[0], {"Content-Type": "image/jpeg"})

    with hs.server_thread({"/peek.jpg": scrape_then_answer}) as server:
        urls = [f"http://127.0.0.1:{server.port}/peek.jpg"]
        pq.write_table(pa.table({"url": urls, "caption": ["c"]}), tmp_path / "list.parquet")
        env = cli_env(PAIRFARM_METRICS_PORT=str(port), PAIRFARM_METRICS_HOST="127.0.0.1")
        done = run_cli("download", str(tmp_path / "list.parquet"), "-o", str(tmp_path / "out"),
                       "--allow-cidr", "127.0.0.0/8", "--no-progress", env=env)
    assert "1 ok" in done.stdout
    samples = {s.name: s.value for family in text_string_to_metric_families(seen[0])
               for s in family.samples if not s.labels}
    assert samples["pairfarm_worker_requests_in_flight"] == 1  # scraped mid-request
    assert samples["process_resident_memory_bytes"] > 0
    with pytest.raises(httpx.ConnectError):  # the server went with the command
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
