"""The coordinator's lease gate (``--lease-concurrency``) and thread pool (``--threads``):
the real app on a real PostgreSQL, its lease transaction held open on purpose."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from coordinator.api import create_app
from coordinator.errors import SettingsError
from coordinator.settings import make_lease_settings, make_settings
from coordinator.tokens import create_token
from pairfarm.protocol import API_PREFIX
from tests.conftest import insert_candidates
from tests.leasing import engine_for


class HeldLeases:
    """Wraps ``Leases.lease_download_raw``: counts the leases in flight and holds each
    until ``release`` is set."""

    def __init__(self, leases: Any) -> None:
        self.original = leases.lease_download_raw
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        leases.lease_download_raw = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        self.entered.release()
        try:
            assert self.release.wait(60), "the test never released the leases"
            return self.original(*args, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


@contextmanager
def served(db_url: str, engine: sa.Engine, **kw: int) -> Iterator[tuple[TestClient, HeldLeases,
                                                                        dict[str, str]]]:
    settings = make_settings(database_url=db_url, lease=make_lease_settings(batch_size=10),
                             **kw)  # type: ignore[arg-type]
    app = create_app(settings, engine, reaper=False)
    held = HeldLeases(app.state.leases)
    _, token = create_token(engine, "worker", "vm-1")
    with TestClient(app) as client:
        yield client, held, {"Authorization": f"Bearer {token}"}


def test_leases_beyond_the_concurrency_wait_and_other_calls_go_on(db_url: str) -> None:
    insert_candidates(db_url, 40)
    with engine_for(db_url) as engine, \
            served(db_url, engine, lease_concurrency=1, threads=2) as (client, held, auth), \
            ThreadPoolExecutor(4) as pool:
        leases = [pool.submit(client.post, f"{API_PREFIX}/download/lease", json={},
                              headers=auth) for _ in range(4)]
        assert held.entered.acquire(timeout=60)
        # three leases wait at the gate; they hold neither the pool's two threads nor a
        # connection, so a registration and a stats read are served meanwhile
        for _ in range(3):
            assert client.post(f"{API_PREFIX}/register", json={"name": "vm-1", "version": "1"},
                               headers=auth).status_code == 200
            assert client.get(f"{API_PREFIX}/stats").status_code == 200
        assert held.in_flight == 1 and not any(f.done() for f in leases)
        held.release.set()
        answers = [f.result(timeout=120) for f in leases]
    assert [a.status_code for a in answers] == [200] * 4
    ids = [i for a in answers for i in a.json()["candidates"]["id"]]
    assert len(ids) == len(set(ids)) == 40
    assert held.most == 1, "never more leases in flight than --lease-concurrency"


def test_the_concurrency_lets_that_many_leases_run_together(db_url: str) -> None:
    insert_candidates(db_url, 30)
    with engine_for(db_url) as engine, \
            served(db_url, engine, lease_concurrency=3) as (client, held, auth), \
            ThreadPoolExecutor(3) as pool:
        leases = [pool.submit(client.post, f"{API_PREFIX}/download/lease", json={},
                              headers=auth) for _ in range(3)]
        for _ in range(3):
            assert held.entered.acquire(timeout=60)
        assert held.in_flight == 3
        held.release.set()
        assert [f.result(timeout=120).status_code for f in leases] == [200] * 3


@pytest.mark.parametrize(("kw", "message"), [
    ({"threads": 0}, "threads must be in 1..64"),
    ({"lease_concurrency": 17}, "lease concurrency must be in 1..16"),
    ({"revocation_check_s": -1.0}, "revocation check must be in 0..300"),
])
def test_bad_pool_settings_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        make_settings(**kw)
