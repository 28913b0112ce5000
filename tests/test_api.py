"""The REST API through a real ``pairfarm coordinator`` subprocess and the real client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from coordinator.timing import app_seconds
from pairfarm.client import CoordinatorClient, LeaseLost, Rejected, Unauthorized
from pairfarm.protocol import API_PREFIX, FailReport, PostprocessReport
from tests.conftest import RunningCoordinator, insert_candidates, run_cli, start_coordinator
from tests.leasing import engine_for, expire, report

BATCH = "/download/1"
ENDPOINTS = [  # (method, path, role allowed besides admin, body)
    ("POST", "/download/lease", "worker", {}),
    ("POST", f"{BATCH}/heartbeat", "worker", {"lease_token": "t"}),
    ("POST", f"{BATCH}/complete", "worker", report("t", 1).model_dump(mode="json")),
    ("POST", f"{BATCH}/fail", "worker", {"lease_token": "t", "reason": "r"}),
    ("POST", "/postprocess/lease", "gpu", {}),
    ("POST", "/postprocess/1/heartbeat", "gpu", {"lease_token": "t"}),
    ("POST", "/postprocess/1/complete", "gpu",
     PostprocessReport(lease_token="t", kept=0, dropped=0, duration_s=0).model_dump()),
    ("POST", "/postprocess/1/fail", "gpu", {"lease_token": "t", "reason": "r"}),
]


def _call(coord: RunningCoordinator, method: str, path: str, body: object,
          token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{coord.url}{API_PREFIX}{path}", json=body,
                         headers=headers, timeout=30)


def test_auth_matrix(coordinator: RunningCoordinator) -> None:
    tokens = {role: coordinator.token(role) for role in ("worker", "gpu")}
    for method, path, role, body in ENDPOINTS:
        for token in (None, "pf_worker_forged"):
            answer = _call(coordinator, method, path, body, token)
            assert answer.status_code == 401, (path, token)
            assert answer.json()["error"] == "auth_error"
        other = "gpu" if role == "worker" else "worker"
        answer = _call(coordinator, method, path, body, tokens[other])
        assert answer.status_code == 403, (path, other)
        assert answer.json()["error"] == "forbidden"
    for token in (None, "pf_worker_forged"):  # read-only aggregates: no token needed
        assert _call(coordinator, "GET", "/stats", None, token).status_code == 200
    assert _call(coordinator, "POST", "/register", {"name": "n", "version": "1"},
                 None).status_code == 401


def test_download_and_postprocess_round_trip(coordinator: RunningCoordinator) -> None:
    insert_candidates(coordinator.database_url, 30)
    admin = CoordinatorClient(coordinator.url, coordinator.token("admin"))
    with CoordinatorClient(coordinator.url, coordinator.token("worker", "vm-1")) as worker, \
            CoordinatorClient(coordinator.url, coordinator.token("gpu", "gpu-1")) as gpu:
        info = worker.register("vm-1.example")
        assert (info.role, info.batch_size) == ("worker", 10_000)
        lease = worker.lease_download(max_size=20)
        assert lease is not None and len(lease.candidates) == 20
        assert {c.url for c in lease.candidates} <= {
            f"http://host{i % 50}.test/{i}.jpg" for i in range(30)}
        worker.heartbeat("download", lease.batch_id, lease.lease_token)
        done = report(lease.lease_token, 20, ok=15)
        state = worker.complete("download", lease.batch_id, done)
        assert worker.complete("download", lease.batch_id, done) == state, "idempotent"
        rest = worker.lease_download()
        assert rest is not None and len(rest.candidates) == 10
        assert worker.lease_download() is None, "204: nothing left"
        pp = gpu.lease_postprocess()
        assert pp is not None and pp.batch_id == lease.batch_id and pp.count == 15
        gpu.complete("postprocess", pp.batch_id, PostprocessReport(
            lease_token=pp.lease_token, kept=12, dropped=3, duration_s=2.0))
        stats = admin.stats()
    assert stats.candidates_total == 30 and stats.candidates_pending == 10
    assert stats.batches["done"] == 1 and stats.batches["leased"] == 1
    assert stats.outcomes == {"ok": 15, "timeout": 5}
    assert (stats.kept, stats.dropped, stats.bytes_downloaded) == (12, 3, 1000)
    assert {w.name for w in stats.workers} >= {"vm-1.example", "gpu-1"}
    holder = next(w for w in stats.workers if w.name == "vm-1.example")
    assert holder.batches == [rest.batch_id]
    admin.close()


def test_fencing_through_the_api(coordinator: RunningCoordinator) -> None:
    insert_candidates(coordinator.database_url, 10)
    with CoordinatorClient(coordinator.url, coordinator.token("worker")) as owner, \
            CoordinatorClient(coordinator.url, coordinator.token("worker")) as other:
        lease = owner.lease_download()
        assert lease is not None
        with pytest.raises(LeaseLost):  # another worker's batch
            other.complete("download", lease.batch_id, report(lease.lease_token, 10))
        with pytest.raises(LeaseLost):  # wrong lease token
            owner.heartbeat("download", lease.batch_id, "stale-token")
        with pytest.raises(Rejected) as invalid:
            owner.complete("download", lease.batch_id, report(lease.lease_token, 12))
        assert invalid.value.status == 422
        owner.fail("download", lease.batch_id,
                   FailReport(lease_token=lease.lease_token, reason="bye", release=True))
        again = other.lease_download()
        assert again is not None and again.batch_id == lease.batch_id


def test_invalid_and_oversized_bodies_get_json_errors(coordinator: RunningCoordinator) -> None:
    token = coordinator.token("worker")
    bad = _call(coordinator, "POST", f"{BATCH}/complete", {"lease_token": 5}, token)
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
    assert "shard" in bad.json()["detail"]
    huge = {"lease_token": "t", "reason": "x" * (2 << 20)}
    big = _call(coordinator, "POST", f"{BATCH}/fail", huge, token)
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"
    missing = _call(coordinator, "POST", "/download/999/heartbeat", {"lease_token": "t"}, token)
    assert missing.status_code == 404


def test_revoked_token_is_refused(coordinator: RunningCoordinator) -> None:
    token = coordinator.token("worker", "doomed")
    with CoordinatorClient(coordinator.url, token) as client:
        client.register("doomed")
        listing = run_cli("token", "list", env=coordinator.env()).stdout
        assert "doomed" in listing and token not in listing
        run_cli("token", "revoke", "doomed", env=coordinator.env())
        # the coordinator knows the token (it registered); it sees the revocation at its
        # next check (--revocation-check, 1 s): refused from then on, never after a grant
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                client.lease_download()
            except Unauthorized:
                break
        else:
            pytest.fail("a revoked token was still accepted 60 s later")
        with pytest.raises(Unauthorized):
            client.lease_download()


def test_openapi_and_health(coordinator: RunningCoordinator) -> None:
    schema = httpx.get(f"{coordinator.url}/openapi.json").json()
    assert f"{API_PREFIX}/download/lease" in schema["paths"]
    assert httpx.get(f"{coordinator.url}/healthz").json() == {"status": "ok"}


def test_server_reaps_expired_leases(db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 10)
    coord = start_coordinator(db_url, tmp_path / "log", "--reap-interval", "0.1")
    try:
        with CoordinatorClient(coord.url, coord.token("worker")) as client:
            lease = client.lease_download()
            assert lease is not None
            with engine_for(db_url) as engine:
                expire(engine, lease.batch_id)
                assert _wait_for_status(engine, lease.batch_id, "pending")
            with pytest.raises(LeaseLost):
                client.complete("download", lease.batch_id, report(lease.lease_token, 10))
    finally:
        coord.stop()


def _wait_for_status(engine: sa.Engine, batch_id: int, status: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            now = conn.execute(sa.text("SELECT status FROM batches WHERE id = :i"),
                               {"i": batch_id}).scalar_one()
        if now == status:
            return True
        time.sleep(0.05)
    return False


def test_unmigrated_database_is_refused_with_a_hint(pg_server: object, tmp_path: Path) -> None:
    from coordinator.db import ensure_database
    from coordinator.migrate import head_revision

    ensure_database(pg_server.url(), "empty_db")  # type: ignore[attr-defined]
    url = pg_server.url("empty_db")  # type: ignore[attr-defined]
    out = run_cli("token", "list", env={**_env(url)}, check=False)
    assert out.returncode == 1 and "pairfarm db upgrade" in out.stderr
    assert f"-> {head_revision()}" in run_cli("db", "upgrade", env=_env(url)).stdout
    assert run_cli("token", "list", env=_env(url)).returncode == 0


def _env(url: str) -> dict[str, str]:
    from tests.conftest import cli_env

    return cli_env(DATABASE_URL=url)


# -- bad input: a clear 422 / 413, the connection kept, nothing stored -------------------

UNTOUCHED = ("leased", 1, None, None, None, None)


def _leased(coord: RunningCoordinator, size: int = 10) -> tuple[str, str, int]:
    """A worker token and a new batch of ``size`` leased to it: (token, lease token, id)."""
    with engine_for(coord.database_url) as engine, engine.connect() as conn:
        start = conn.execute(sa.text("SELECT count(*) FROM candidates")).scalar_one()
    insert_candidates(coord.database_url, size, start=start)
    token = coord.token("worker")
    with CoordinatorClient(coord.url, token) as client:
        lease = client.lease_download()
    assert lease is not None and len(lease.candidates) == size
    return token, lease.lease_token, lease.batch_id


def _batch(coord: RunningCoordinator, batch_id: int) -> tuple[object, ...]:
    with engine_for(coord.database_url) as engine, engine.connect() as conn:
        return tuple(conn.execute(sa.text(
            "SELECT status, attempts, last_error, shard, outcomes, bytes_downloaded "
            "FROM batches WHERE id = :i"), {"i": batch_id}).one())


def _complete_body(lease_token: str, **changes: object) -> dict[str, object]:
    body: dict[str, object] = report(lease_token, 10).model_dump(mode="json")
    shard = dict(body["shard"])  # type: ignore[call-overload]
    for key, value in changes.items():
        if key.startswith("shard."):
            shard[key.removeprefix("shard.")] = value
        else:
            body[key] = value
    body["shard"] = shard
    return body


def _refused(coord: RunningCoordinator, token: str, path: str, body: object,
             *fields: str) -> str:
    """POST ``body`` as Python's json writes it (NaN, Infinity, ``\\u0000`` and lone
    surrogates included); assert a 422 naming every one of ``fields`` on a connection that
    still serves the next request. Returns the detail."""
    with httpx.Client(base_url=f"{coord.url}{API_PREFIX}", timeout=30,
                      headers={"Authorization": f"Bearer {token}",
                               "Content-Type": "application/json"}) as http:
        answer = http.post(path, content=json.dumps(body).encode())
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] in ("invalid_request", "invalid_report"), answer.text
        detail = str(answer.json()["detail"])
        for field in fields:
            assert field in detail, detail
        assert http.get("/stats").status_code == 200, "the connection serves on"
    return detail


def test_register_name_with_nul_or_lone_surrogate_is_refused(
        coordinator: RunningCoordinator) -> None:
    token = coordinator.token("worker", "nul-test")
    for name, why in (("vm\x001", "NUL"), ("vm\ud8001", "unicode")):
        detail = _refused(coordinator, token, "/register", {"name": name, "version": "1"},
                          "body.name")
        assert why in detail, detail
    with engine_for(coordinator.database_url) as engine, engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM workers")).scalar_one() == 0


def test_fail_reason_with_nul_is_refused(coordinator: RunningCoordinator) -> None:
    token, lease_token, batch_id = _leased(coordinator)
    detail = _refused(coordinator, token, f"/download/{batch_id}/fail",
                      {"lease_token": lease_token, "reason": "disk\x00full"}, "body.reason")
    assert "NUL" in detail
    assert _batch(coordinator, batch_id) == UNTOUCHED


def test_shard_path_with_nul_is_refused(coordinator: RunningCoordinator) -> None:
    token, lease_token, batch_id = _leased(coordinator)
    body = _complete_body(lease_token, **{"shard.tar": "s/0000\x000001.tar"})
    assert "NUL" in _refused(coordinator, token, f"/download/{batch_id}/complete", body,
                             "body.shard.tar")
    assert _batch(coordinator, batch_id) == UNTOUCHED


def test_bytes_downloaded_beyond_bigint_is_refused(coordinator: RunningCoordinator) -> None:
    token, lease_token, batch_id = _leased(coordinator)
    body = _complete_body(lease_token, bytes_downloaded=2**63)
    _refused(coordinator, token, f"/download/{batch_id}/complete", body,
             "body.bytes_downloaded", str(2**63 - 1))
    assert _batch(coordinator, batch_id) == UNTOUCHED


def test_counts_must_be_json_integers(coordinator: RunningCoordinator) -> None:
    cases = [("outcomes", {"ok": 10.0}), ("outcomes", {"ok": True, "timeout": 9}),
             ("outcomes", {"ok": "5", "timeout": 5}), ("bytes_downloaded", 10.0),
             ("bytes_downloaded", True), ("bytes_downloaded", "5"),
             ("shard.tar_bytes", "5")]
    for field, value in cases:
        token, lease_token, batch_id = _leased(coordinator)
        body = _complete_body(lease_token, **{field: value})
        _refused(coordinator, token, f"/download/{batch_id}/complete", body, f"body.{field}")
        assert _batch(coordinator, batch_id) == UNTOUCHED, (field, value)


def test_lease_sizes_and_flags_are_strict_too(coordinator: RunningCoordinator) -> None:
    token, lease_token, batch_id = _leased(coordinator)
    insert_candidates(coordinator.database_url, 10, start=10)
    for max_size in (5.0, "5", True, 2**31):
        _refused(coordinator, token, "/download/lease", {"max_size": max_size},
                 "body.max_size")
    for release in (1, "true"):
        _refused(coordinator, token, f"/download/{batch_id}/fail",
                 {"lease_token": lease_token, "reason": "r", "release": release},
                 "body.release")
    assert _batch(coordinator, batch_id) == UNTOUCHED
    with engine_for(coordinator.database_url) as engine, engine.connect() as conn:
        leased = conn.execute(sa.text(
            "SELECT count(*) FROM batches WHERE status = 'leased'")).scalar_one()
    assert leased == 1, "the refused lease requests leased nothing"


def test_infinite_or_nan_duration_is_refused(coordinator: RunningCoordinator) -> None:
    for duration in (float("inf"), float("-inf"), float("nan")):
        token, lease_token, batch_id = _leased(coordinator)
        body = _complete_body(lease_token, duration_s=duration)
        assert "finite" in _refused(coordinator, token, f"/download/{batch_id}/complete",
                                    body, "body.duration_s")
        assert _batch(coordinator, batch_id) == UNTOUCHED


def test_shard_locations_outside_the_storage_schemes_are_refused(
        coordinator: RunningCoordinator) -> None:
    cases = [("file:///etc/passwd", "not a .tar file"), ("/etc/passwd", "not a .tar file"),
             ("file:///srv/farm/../../etc/00000001.tar", "'..'"),
             ("http://169.254.169.254/latest/00000001.tar", "outside the allowed"),
             ("gs://bucket/00000001.tar", "outside the allowed")]
    for tar, why in cases:
        token, lease_token, batch_id = _leased(coordinator)
        body = _complete_body(lease_token, **{"shard.tar": tar})
        assert why in _refused(coordinator, token, f"/download/{batch_id}/complete", body,
                               "shard.tar")
        assert _batch(coordinator, batch_id) == UNTOUCHED, tar


def test_shard_prefix_setting_limits_the_locations(db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 20)
    coord = start_coordinator(db_url, tmp_path / "log", "--shard-prefix", "s3://farm/shards/",
                              "--batch-size", "10")
    try:
        token = coord.token("worker")
        with CoordinatorClient(coord.url, token) as client:
            leases = [client.lease_download(), client.lease_download()]
        assert leases[0] is not None and leases[1] is not None
        outside = _complete_body(leases[0].lease_token,
                                 **{"shard.tar": "file:///srv/farm/00000001.tar"})
        _refused(coord, token, f"/download/{leases[0].batch_id}/complete", outside,
                 "s3://farm/shards/")
        inside = {f"shard.{name}": f"s3://farm/shards/00000001.{ext}" for name, ext in
                  (("tar", "tar"), ("parquet", "parquet"), ("stats", "json"))}
        done = httpx.post(f"{coord.url}{API_PREFIX}/download/{leases[1].batch_id}/complete",
                          json=_complete_body(leases[1].lease_token, **inside), timeout=30,
                          headers={"Authorization": f"Bearer {token}"})
        assert done.status_code == 200, done.text
    finally:
        coord.stop()


def test_a_chunked_body_over_the_cap_gets_413(coordinator: RunningCoordinator) -> None:
    token = coordinator.token("worker")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def chunks() -> Iterator[bytes]:
        yield b'{"lease_token": "t", "reason": "'
        for _ in range(32):
            yield b"x" * 65536
        yield b'"}'

    answer = httpx.post(f"{coordinator.url}{API_PREFIX}{BATCH}/fail", content=chunks(),
                        headers=headers, timeout=30)
    assert answer.status_code == 413 and answer.json()["error"] == "body_too_large"
    small = httpx.post(f"{coordinator.url}{API_PREFIX}/register", headers=headers,
                       content=iter([b'{"name": "chunked", ', b'"version": "1"}']), timeout=30)
    assert small.status_code == 200, "a chunked body under the cap is served"


def test_a_value_the_database_refuses_is_a_422_not_a_500(db_url: str) -> None:
    from fastapi.testclient import TestClient

    from coordinator.api import create_app
    from coordinator.settings import make_settings

    with engine_for(db_url) as engine:
        app = create_app(make_settings(database_url=db_url), engine, reaper=False)

        @app.get("/test-data-error")
        def data_error() -> None:  # a real DataError from PostgreSQL: 'x' is no integer
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT CAST(:v AS integer)"), {"v": "x"})

        with TestClient(app, raise_server_exceptions=False) as client:
            answer = client.get("/test-data-error")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_value"
    assert "integer" in answer.json()["detail"]


def test_every_answer_says_how_long_the_app_took(coordinator: RunningCoordinator) -> None:
    insert_candidates(coordinator.database_url, 5)
    token = coordinator.token("worker")
    for body, token_used, status in (({}, token, 200), ({}, None, 401),
                                     ({"max_size": "x"}, token, 422)):
        t0 = time.perf_counter()
        answer = _call(coordinator, "POST", "/download/lease", body, token_used)
        elapsed = time.perf_counter() - t0
        assert answer.status_code == status
        took = app_seconds(answer.headers.get("server-timing"))
        assert took is not None, answer.headers
        assert 0 <= took <= elapsed
