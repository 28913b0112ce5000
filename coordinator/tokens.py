"""API tokens: one per client and role, random, shown once, stored as sha256 only.

A token is ``pf_<role>_<43 url-safe chars>`` (256 random bits), so a plain sha256 suffices
(no salt or slow hash: nothing to brute-force). Tokens are revoked, never deleted, so that
the batches a revoked client held keep their history.

Error handling: ``AuthError`` for an unknown or revoked token, ``Forbidden`` for a token
whose role may not act, ``SettingsError`` for a bad role or name.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from coordinator.errors import AuthError, Forbidden, NotFound, SettingsError
from coordinator.queries import Q, int_array
from pairfarm.protocol import Role

PREFIX = "pf"


@dataclass(frozen=True)
class TokenInfo:
    id: int
    role: Role
    name: str


@dataclass(frozen=True)
class TokenRow:
    id: int
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_seen_at: datetime | None


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token(role: Role) -> str:
    return f"{PREFIX}_{role.value}_{secrets.token_urlsafe(32)}"


def create_token(engine: sa.Engine, role: str, name: str) -> tuple[int, str]:
    """Store a new token's hash; return its id and the token (shown once)."""
    try:
        parsed = Role(role)
    except ValueError:
        roles = [r.value for r in Role]
        raise SettingsError(f"role must be one of {roles}, not {role!r}") from None
    if not name or len(name) > 200:
        raise SettingsError("a token needs a name of 1 to 200 characters")
    token = new_token(parsed)
    with engine.begin() as conn:
        token_id = conn.execute(Q.insert_token, {"role": parsed.value, "name": name,
                                                 "token_sha256": hash_token(token)}).scalar_one()
    return int(token_id), token


def authenticate(engine: sa.Engine, token: str | None) -> TokenInfo:
    return _lookup(engine, _hash_of(token))


def _hash_of(token: str | None) -> bytes:
    if not token:
        raise AuthError("no bearer token: send 'Authorization: Bearer <token>'")
    return hash_token(token)


def _lookup(engine: sa.Engine, digest: bytes) -> TokenInfo:
    with engine.connect() as conn:
        row = conn.execute(Q.token_by_hash, {"token_sha256": digest}).first()
    if row is None:
        raise AuthError("unknown or revoked token")
    return TokenInfo(id=row.id, role=Role(row.role), name=row.name)


class TokenCache:
    """Valid tokens by hash, so that a request costs no token lookup, kept until a
    revocation is seen.

    At most once per ``recheck_s`` a request reads the tokens' revocation mark (how many
    are revoked, and the latest ``revoked_at``: one small query); when it moved, the
    cache is emptied. A revoked token is therefore refused within ``recheck_s`` (and the
    query's time) in every process, whatever its request rate. ``recheck_s`` 0: no
    cache, every request looks its token up. Unknown tokens are not cached (each costs
    a lookup, as without the cache); at most ``max_entries`` are kept (oldest dropped).
    """

    def __init__(self, recheck_s: float, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.recheck_s = recheck_s
        self.max_entries = max_entries
        self._clock = clock
        self._known: dict[bytes, TokenInfo] = {}
        self._mark: tuple[int, datetime | None] | None = None
        self._next_check = float("-inf")
        self._lock = threading.Lock()

    def authenticate(self, engine: sa.Engine, token: str | None) -> TokenInfo:
        digest = _hash_of(token)
        if self.recheck_s <= 0:
            return _lookup(engine, digest)
        self._check_revocations(engine)
        with self._lock:
            known = self._known.get(digest)
        if known is not None:
            return known
        info = _lookup(engine, digest)
        with self._lock:
            if len(self._known) >= self.max_entries:
                del self._known[next(iter(self._known))]
            self._known[digest] = info
        return info

    def _check_revocations(self, engine: sa.Engine) -> None:
        now = self._clock()
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self.recheck_s
        with engine.connect() as conn:
            row = conn.execute(Q.revocation_mark).one()
        mark = (int(row.revoked), row.latest)
        with self._lock:
            if mark != self._mark:
                self._known.clear()
                self._mark = mark


def require(info: TokenInfo, *roles: Role) -> None:
    """Admit ``info`` if its role is one of ``roles`` (admin is always admitted)."""
    if info.role is not Role.ADMIN and info.role not in roles:
        allowed = ", ".join(r.value for r in (*roles, Role.ADMIN))
        raise Forbidden(f"a {info.role.value} token may not do this (needs: {allowed})")


def touch_worker(engine: sa.Engine, info: TokenInfo, name: str | None = None,
                 version: str | None = None) -> int:
    """The worker id of ``info``'s client, created on first contact; marks it seen."""
    with engine.begin() as conn:
        return int(conn.execute(Q.touch_worker, {
            "token_id": info.id, "role": info.role.value, "name": name or info.name,
            "version": version, "new_name": name, "new_version": version}).scalar_one())


class SeenCache:
    """Worker ids by token, and their ``last_seen_at`` written in bulk: a call marks its
    worker seen in memory, and at most once per ``interval_s`` one call writes every
    worker marked since (one UPDATE) instead of a write transaction per call, however
    far apart each client's calls are. ``last_seen_at`` is then at most ``interval_s``
    (plus the time to the next call) old, against the 900 s window in which a worker
    counts as alive. A token's first call, and registering (it may rename), write at
    once. ``interval_s`` 0: every call writes."""

    def __init__(self, interval_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._ids: dict[int, int] = {}
        self._marked: set[int] = set()
        self._written_at = clock()
        self._lock = threading.Lock()

    def worker_id(self, engine: sa.Engine, info: TokenInfo) -> int:
        with self._lock:
            wid = self._ids.get(info.id)
            if wid is not None:
                self._marked.add(wid)
        if wid is None:
            return self.touch(engine, info)
        self._write_marked(engine)
        return wid

    def touch(self, engine: sa.Engine, info: TokenInfo, name: str | None = None,
              version: str | None = None) -> int:
        wid = touch_worker(engine, info, name, version)
        with self._lock:
            self._ids[info.id] = wid
        return wid

    def _write_marked(self, engine: sa.Engine) -> None:
        now = self._clock()
        with self._lock:
            if now - self._written_at < self.interval_s or not self._marked:
                return
            ids, self._marked = sorted(self._marked), set()
            self._written_at = now
        with engine.begin() as conn:
            conn.execute(Q.mark_workers_seen, {"ids": int_array(ids)})


def list_tokens(engine: sa.Engine) -> list[TokenRow]:
    with engine.connect() as conn:
        return [TokenRow(**r._mapping) for r in conn.execute(Q.list_tokens)]


def revoke_token(engine: sa.Engine, ident: str) -> TokenInfo:
    """Revoke the token whose id or name is ``ident``."""
    token_id = int(ident) if ident.isdigit() else -1
    with engine.begin() as conn:
        rows = conn.execute(Q.revoke_token, {"id": token_id, "name": ident}).all()
    if not rows:
        raise NotFound(f"no active token with id or name {ident!r}")
    row = rows[0]
    return TokenInfo(id=row.id, role=Role(row.role), name=row.name)
