"""``GET /api/v1/stats`` figures (rate, ETA, throughput, workers, post-processing) and
``pairfarm status``, against a real coordinator subprocess."""

from __future__ import annotations

import json

import httpx
import pytest
import sqlalchemy as sa

from pairfarm.client import CoordinatorClient
from pairfarm.protocol import API_PREFIX, FarmStats, PostprocessReport
from tests.conftest import RunningCoordinator, cli_env, insert_candidates, run_cli
from tests.docs_text import docs_text
from tests.leasing import engine_for, report

EDGES = [0.0, 0.25, 0.5, 0.75, 1.0]


def build_farm(coord: RunningCoordinator) -> dict[str, int]:
    """40 candidates: a batch of 20 downloaded and post-processed, one of 10 downloaded,
    one of 10 leased by vm-1; the batch ids by role."""
    insert_candidates(coord.database_url, 40)
    with CoordinatorClient(coord.url, coord.token("worker", "vm-1")) as worker, \
            CoordinatorClient(coord.url, coord.token("gpu", "gpu-1")) as gpu:
        worker.register("vm-1")
        gpu.register("gpu-1")
        ids = {}
        for name, size, ok in (("first", 20, 15), ("second", 10, 10)):
            lease = worker.lease_download(max_size=size)
            assert lease is not None and len(lease.candidates) == size
            worker.complete("download", lease.batch_id, report(lease.lease_token, size, ok))
            ids[name] = lease.batch_id
        held = worker.lease_download()
        assert held is not None and len(held.candidates) == 10
        ids["held"] = held.batch_id
        pp = gpu.lease_postprocess()
        assert pp is not None and pp.batch_id == ids["first"]
        gpu.complete("postprocess", pp.batch_id, PostprocessReport(
            lease_token=pp.lease_token, kept=12, dropped=3, similarity_edges=EDGES,
            similarity_counts=[1, 2, 4, 8], duration_s=1.0))
    return ids


def age_the_farm(db_url: str, ids: dict[str, int]) -> None:
    """The farm started an hour ago; the first batch was downloaded 5 minutes ago, the
    second 11 minutes ago (outside the 10-minute rate window)."""
    with engine_for(db_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("UPDATE batches SET created_at = now() - interval '1 hour'"))
        conn.execute(sa.text("UPDATE workers SET registered_at = now() - interval '1 hour'"))
        for key, minutes in (("first", 5), ("second", 11)):
            conn.execute(sa.text("UPDATE batches SET downloaded_at = now() - "
                                 "make_interval(mins => :m) WHERE id = :id"),
                         {"m": minutes, "id": ids[key]})


def test_stats_rate_eta_throughput_workers_postprocess(
        coordinator: RunningCoordinator) -> None:
    ids = build_farm(coordinator)
    age_the_farm(coordinator.database_url, ids)
    with CoordinatorClient(coordinator.url) as public:  # no token
        stats = public.stats()
    assert (stats.candidates_total, stats.candidates_pending) == (40, 10)
    assert stats.progress_pct == pytest.approx(75.0)
    assert stats.rate_window_s == 600
    assert stats.download_rate_per_s == pytest.approx(20 / 600)
    assert stats.eta_s == pytest.approx(10 / (20 / 600))
    assert len(stats.throughput) == 60
    assert stats.throughput[-1].start <= stats.generated_at  # type: ignore[operator]
    busy = [(p.candidates, p.ok) for p in stats.throughput if p.candidates]
    assert busy == [(10, 10), (20, 15)], "oldest first"
    worker = next(w for w in stats.workers if w.name == "vm-1")
    assert worker.rate_per_s == pytest.approx(20 / 600)
    assert (worker.batches, worker.downloaded) == ([ids["held"]], 30)
    assert worker.last_seen_s is not None and 0 <= worker.last_seen_s < 60
    gpu = next(w for w in stats.workers if w.name == "gpu-1")
    assert (gpu.rate_per_s, gpu.batches) == (None, [])
    assert (stats.postprocess_batches_done, stats.postprocess_batches_total) == (1, 2)
    assert stats.kept_ratio == pytest.approx(0.8)
    assert (stats.similarity.edges, stats.similarity.counts) == (EDGES, [1, 2, 4, 8])


def test_stats_of_an_empty_farm(coordinator: RunningCoordinator) -> None:
    with CoordinatorClient(coordinator.url) as public:
        stats = public.stats()
    assert (stats.candidates_total, stats.progress_pct, stats.download_rate_per_s) == (0, 0, 0)
    assert stats.eta_s is None and stats.kept_ratio is None
    assert sum(p.candidates for p in stats.throughput) == 0
    assert stats.similarity.edges == [] and stats.similarity.counts == []


def test_pairfarm_status_prints_the_farm(coordinator: RunningCoordinator) -> None:
    ids = build_farm(coordinator)
    age_the_farm(coordinator.database_url, ids)
    out = run_cli("status", "--coordinator", coordinator.url).stdout
    for text in ("75.0 %", "0.03/s", "5m 00s", "downloaded", "postprocessing", "timeout",
                 "vm-1", "gpu-1", "80.0 %", "workers (2 alive)"):
        assert text in out, (text, out)
    row = next(line for line in out.splitlines() if "vm-1" in line)
    assert str(ids["held"]) in row and "30" in row


def test_pairfarm_status_json_from_the_environment(coordinator: RunningCoordinator) -> None:
    build_farm(coordinator)
    out = run_cli("status", "--json", env=cli_env(PAIRFARM_COORDINATOR=coordinator.url)).stdout
    printed = FarmStats.model_validate_json(out)
    served = FarmStats.model_validate(
        httpx.get(f"{coordinator.url}{API_PREFIX}/stats", timeout=30).json())
    volatile = {"generated_at", "workers", "download_rate_per_s", "eta_s", "throughput"}
    assert printed.model_dump(exclude=volatile) == served.model_dump(exclude=volatile)
    assert [w.name for w in printed.workers] == [w.name for w in served.workers]


def test_pairfarm_status_unreachable_coordinator() -> None:
    out = run_cli("status", "--coordinator", "http://127.0.0.1:1", check=False)
    assert out.returncode == 1
    assert "cannot read the farm's stats from http://127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr


def test_farm_stats_parse_across_versions() -> None:
    old = {"candidates_total": 3, "candidates_pending": 1, "batches": {}, "outcomes": {},
           "bytes_downloaded": 0, "kept": 0, "dropped": 0, "workers_alive": 0}
    assert FarmStats.model_validate(old).throughput == []  # an older coordinator
    newer = FarmStats.model_validate_json(json.dumps({**old, "from_the_future": 1}))
    assert newer.candidates_total == 3


def test_readme_documents_pairfarm_status() -> None:
    readme = docs_text()
    for text in ("pairfarm status", "--coordinator", "PAIRFARM_COORDINATOR", "--json"):
        assert text in readme, text
