"""``coordinator.tokens``: the token cache and the bulk "seen" marks, on a real
PostgreSQL with a fake clock."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from coordinator.errors import AuthError
from coordinator.tokens import SeenCache, TokenCache, authenticate, create_token, revoke_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _statements(engine: sa.Engine) -> list[str]:
    """Record the SQL the engine runs from now on (the list grows)."""
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: seen.append(statement))
    return seen


def test_a_seen_token_costs_no_lookup_until_a_revocation_is_seen(engine: sa.Engine) -> None:
    clock = Clock()
    cache = TokenCache(recheck_s=1.0, clock=clock)
    _, token = create_token(engine, "worker", "vm-1")
    _, other = create_token(engine, "worker", "vm-2")
    info = cache.authenticate(engine, token)
    assert cache.authenticate(engine, other).name == "vm-2"
    statements = _statements(engine)
    for _ in range(5):
        assert cache.authenticate(engine, token) == info
    assert statements == [], "a known token within the check interval reads nothing"

    revoke_token(engine, "vm-1")
    assert cache.authenticate(engine, token) == info, "not seen before the next check"
    clock.now += 1.0
    with pytest.raises(AuthError, match="unknown or revoked"):
        cache.authenticate(engine, token)
    assert cache.authenticate(engine, other).name == "vm-2", "looked up again, still valid"
    assert len([s for s in statements if "FROM tokens" in s]) == 3
    statements.clear()
    clock.now += 5.0  # a check that finds the same mark keeps the cache
    assert cache.authenticate(engine, other).name == "vm-2"
    assert len(statements) == 1 and "revoked_at IS NOT NULL" in statements[0]


def test_without_the_cache_every_request_looks_up(engine: sa.Engine) -> None:
    cache = TokenCache(recheck_s=0)
    _, token = create_token(engine, "worker", "vm-1")
    cache.authenticate(engine, token)
    revoke_token(engine, "vm-1")
    with pytest.raises(AuthError):
        cache.authenticate(engine, token)


def test_unknown_tokens_are_not_kept_and_the_cache_is_bounded(engine: sa.Engine) -> None:
    cache = TokenCache(recheck_s=60, max_entries=2, clock=Clock())
    tokens = [create_token(engine, "worker", f"vm-{i}")[1] for i in range(3)]
    statements = _statements(engine)
    for _ in range(2):
        with pytest.raises(AuthError):
            cache.authenticate(engine, "pf_worker_forged")
        with pytest.raises(AuthError, match="no bearer token"):
            cache.authenticate(engine, None)
    assert sum("FROM tokens" in s for s in statements) == 3  # the mark, then 2 lookups
    for token in tokens:
        cache.authenticate(engine, token)
    statements.clear()
    cache.authenticate(engine, tokens[2])
    assert statements == []
    cache.authenticate(engine, tokens[0])  # the oldest was dropped for the third
    assert len(statements) == 1


def test_workers_are_marked_seen_in_one_write_per_interval(engine: sa.Engine) -> None:
    clock = Clock()
    seen = SeenCache(interval_s=5.0, clock=clock)
    infos = [authenticate(engine, create_token(engine, "worker", f"vm-{i}")[1])
             for i in range(3)]
    ids = [seen.worker_id(engine, info) for info in infos]  # first calls write at once

    def last_seen() -> dict[int, object]:
        with engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT id, last_seen_at FROM workers")).all())

    first = last_seen()
    assert set(first) == set(ids)
    statements = _statements(engine)
    assert [seen.worker_id(engine, info) for info in infos[:2]] == ids[:2]
    assert statements == [] and last_seen() == first, "within the interval: nothing written"
    statements.clear()
    clock.now += 5.0
    assert seen.worker_id(engine, infos[0]) == ids[0]
    assert len(statements) == 1 and "UPDATE workers" in statements[0]
    after = last_seen()
    assert after[ids[0]] != first[ids[0]] and after[ids[1]] != first[ids[1]]
    assert after[ids[2]] == first[ids[2]], "a worker that did not call is not marked"
    statements.clear()
    assert seen.touch(engine, infos[2], name="renamed") == ids[2]
    assert len(statements) == 1, "register writes at once"
