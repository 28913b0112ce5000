"""The coordinator's ``GET /metrics``: names, in-process counters and the families read
from the database, on a real ``pairfarm coordinator`` subprocess and the real client."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import make_metrics, metric_names, stats_source
from pairfarm.client import CoordinatorClient, LeaseLost, Throttled
from pairfarm.protocol import FailReport, PostprocessReport
from tests.conftest import insert_candidates, start_coordinator
from tests.leasing import engine_for, expire, report

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SPEC_NAMES = {
    "pairfarm_candidates", "pairfarm_batches", "pairfarm_leases_total",
    "pairfarm_completions_total", "pairfarm_failures_total", "pairfarm_lease_expiries_total",
    "pairfarm_fencing_rejections_total", "pairfarm_lease_duration_seconds_bucket",
    "pairfarm_lease_duration_seconds_sum", "pairfarm_lease_duration_seconds_count",
    "pairfarm_url_outcomes_total", "pairfarm_downloaded_bytes_total",
    "pairfarm_workers_alive", "pairfarm_workers_quarantined",
    "pairfarm_postprocess_samples_total",
    "pairfarm_similarity_bucket", "pairfarm_similarity_sum", "pairfarm_similarity_count",
    "process_resident_memory_bytes",
}


def scrape(url: str) -> Samples:
    answer = httpx.get(f"{url}/metrics", timeout=30)  # no token
    assert answer.status_code == 200
    assert answer.headers["content-type"] == CONTENT_TYPE_LATEST
    return parse(answer.text)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metric_names_cover_the_spec() -> None:
    names = metric_names()
    assert names >= SPEC_NAMES, SPEC_NAMES - names
    assert all(n.startswith(("pairfarm_", "process_", "python_")) for n in names)


def test_scrape_without_a_database_serves_the_process_metrics() -> None:
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none",
                              connect_args={"connect_timeout": 2})
    try:
        text = generate_latest(make_metrics(stats_source(engine, 900.0)).registry).decode()
    finally:
        engine.dispose()
    samples = parse(text)
    assert value(samples, "pairfarm_leases_total", kind="download") == 0
    assert not any(name == "pairfarm_batches" for name, _ in samples)


def test_metrics_count_leases_completions_failures_fencing_and_expiry(
        db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 30)
    coord = start_coordinator(db_url, tmp_path / "coordinator.log", "--reap-interval", "0.1")
    try:
        before = scrape(coord.url)
        assert value(before, "pairfarm_leases_total", kind="download") == 0
        assert value(before, "pairfarm_candidates", state="unbatched") == 30
        with CoordinatorClient(coord.url, coord.token("worker", "vm-a")) as a, \
                CoordinatorClient(coord.url, coord.token("worker", "vm-b")) as b, \
                CoordinatorClient(coord.url, coord.token("gpu", "gpu-1")) as gpu:
            _run_farm(a, b, gpu, db_url)
        after = scrape(coord.url)
    finally:
        coord.stop()
    _check_counters(after)
    _check_database_families(after)


def test_quarantined_workers_gauge(db_url: str, tmp_path: Path) -> None:
    """--quarantine-after 2: a worker that fails two batches in a row is refused leases
    (429) and counted by pairfarm_workers_quarantined; a healthy worker is not."""
    insert_candidates(db_url, 40)
    coord = start_coordinator(db_url, tmp_path / "coordinator.log", "--batch-size", "10",
                              "--quarantine-after", "2")
    try:
        with CoordinatorClient(coord.url, coord.token("worker", "broken")) as broken, \
                CoordinatorClient(coord.url, coord.token("worker", "healthy")) as healthy:
            healthy.register("healthy")
            broken.register("broken")
            assert value(scrape(coord.url), "pairfarm_workers_quarantined") == 0
            for _ in range(2):
                lease = broken.lease_download()
                assert lease is not None
                assert value(scrape(coord.url), "pairfarm_workers_quarantined") == 0
                broken.fail("download", lease.batch_id, FailReport(
                    lease_token=lease.lease_token, reason="create output directory: File exists"))
            with pytest.raises(Throttled):
                broken.lease_download()
            assert healthy.lease_download() is not None
            after = scrape(coord.url)
    finally:
        coord.stop()
    assert value(after, "pairfarm_workers_quarantined") == 1
    assert value(after, "pairfarm_workers_alive", role="worker") == 2


def _run_farm(a: CoordinatorClient, b: CoordinatorClient, gpu: CoordinatorClient,
              db_url: str) -> None:
    """4 download leases (1 released, 1 expired) + a 204, 3 rejections (409), 1 download
    and 1 post-processing completion, a post-processing lease and a 204."""
    first = a.lease_download(max_size=20)
    assert first is not None
    with pytest.raises(LeaseLost):
        a.heartbeat("download", first.batch_id, "stale-token")
    with pytest.raises(LeaseLost):
        b.complete("download", first.batch_id, report(first.lease_token, 20, ok=15))
    done = report(first.lease_token, 20, ok=15)
    a.complete("download", first.batch_id, done)
    a.complete("download", first.batch_id, done)  # the same report again: not counted
    second = a.lease_download()
    assert second is not None and len(second.candidates) == 10
    a.fail("download", second.batch_id,
           FailReport(lease_token=second.lease_token, reason="shutdown", release=True))
    again = b.lease_download()
    assert again is not None and again.batch_id == second.batch_id
    with engine_for(db_url) as engine:
        expire(engine, again.batch_id)
        _wait_for(engine, again.batch_id, "pending")
    with pytest.raises(LeaseLost):
        b.fail("download", again.batch_id, FailReport(lease_token=again.lease_token,
                                                      reason="too late"))
    assert a.lease_download() is not None  # the expired batch, a fourth lease
    assert a.lease_download() is None  # 204: every candidate is batched
    pp = gpu.lease_postprocess()
    assert pp is not None and pp.batch_id == first.batch_id
    gpu.complete("postprocess", pp.batch_id, PostprocessReport(
        lease_token=pp.lease_token, kept=12, dropped=3, similarity_edges=[0.0, 0.5, 1.0],
        similarity_counts=[5, 10], duration_s=1.0))
    assert gpu.lease_postprocess() is None


def _check_counters(s: Samples) -> None:
    assert value(s, "pairfarm_leases_total", kind="download") == 4
    assert value(s, "pairfarm_leases_total", kind="postprocess") == 1
    assert value(s, "pairfarm_completions_total", kind="download") == 1
    assert value(s, "pairfarm_completions_total", kind="postprocess") == 1
    assert value(s, "pairfarm_failures_total", kind="download") == 1
    assert value(s, "pairfarm_failures_total", kind="postprocess") == 0
    assert value(s, "pairfarm_lease_expiries_total", kind="download") == 1
    assert value(s, "pairfarm_lease_expiries_total", kind="postprocess") == 0
    for action, count in (("heartbeat", 1), ("complete", 1), ("fail", 1)):
        assert value(s, "pairfarm_fencing_rejections_total", kind="download",
                     action=action) == count, action
    assert value(s, "pairfarm_lease_duration_seconds_count", kind="download") == 5
    assert value(s, "pairfarm_lease_duration_seconds_count", kind="postprocess") == 2
    assert value(s, "pairfarm_lease_duration_seconds_bucket", kind="download", le="+Inf") == 5
    assert value(s, "pairfarm_lease_duration_seconds_sum", kind="download") > 0
    assert value(s, "process_resident_memory_bytes") > 0


def _check_database_families(s: Samples) -> None:
    batches = {"pending": 0, "leased": 1, "downloaded": 0, "postprocessing": 0, "done": 1,
               "failed": 0}
    for state, count in batches.items():
        assert value(s, "pairfarm_batches", state=state) == count, state
    candidates = {"unbatched": 0, "pending": 0, "leased": 10, "done": 20, "failed": 0}
    for state, count in candidates.items():
        assert value(s, "pairfarm_candidates", state=state) == count, state
    assert value(s, "pairfarm_url_outcomes_total", outcome="ok") == 15
    assert value(s, "pairfarm_url_outcomes_total", outcome="timeout") == 5
    assert value(s, "pairfarm_url_outcomes_total", outcome="dns") == 0
    assert value(s, "pairfarm_downloaded_bytes_total") == 1000
    assert value(s, "pairfarm_workers_alive", role="worker") == 2
    assert value(s, "pairfarm_workers_alive", role="gpu") == 1
    assert value(s, "pairfarm_workers_alive", role="admin") == 0
    assert value(s, "pairfarm_postprocess_samples_total", decision="kept") == 12
    assert value(s, "pairfarm_postprocess_samples_total", decision="dropped") == 3
    assert value(s, "pairfarm_similarity_bucket", le="0.5") == 5
    assert value(s, "pairfarm_similarity_bucket", le="1.0") == 15
    assert value(s, "pairfarm_similarity_bucket", le="+Inf") == 15
    assert value(s, "pairfarm_similarity_count") == 15
    assert value(s, "pairfarm_similarity_sum") == pytest.approx(0.25 * 5 + 0.75 * 10)


def _wait_for(engine: sa.Engine, batch_id: int, status: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            now = conn.execute(sa.text("SELECT status FROM batches WHERE id = :i"),
                               {"i": batch_id}).scalar_one()
        if now == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not become {status}")
