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
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from coordinator.errors import AuthError, Forbidden, NotFound, SettingsError
from coordinator.queries import Q
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
    if not token:
        raise AuthError("no bearer token: send 'Authorization: Bearer <token>'")
    with engine.connect() as conn:
        row = conn.execute(Q.token_by_hash, {"token_sha256": hash_token(token)}).first()
    if row is None:
        raise AuthError("unknown or revoked token")
    return TokenInfo(id=row.id, role=Role(row.role), name=row.name)


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
    """Worker ids by token, so that a client calling several times a second marks itself
    seen (one write transaction) at most once per ``interval_s`` instead of on every
    call. ``last_seen_at`` is then at most ``interval_s`` old, against the 900 s window in
    which a worker counts as alive. Registering always writes (it may rename)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._seen: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def worker_id(self, engine: sa.Engine, info: TokenInfo) -> int:
        now = time.monotonic()
        with self._lock:
            cached = self._seen.get(info.id)
        if cached is not None and now - cached[1] < self.interval_s:
            return cached[0]
        return self.touch(engine, info)

    def touch(self, engine: sa.Engine, info: TokenInfo, name: str | None = None,
              version: str | None = None) -> int:
        wid = touch_worker(engine, info, name, version)
        with self._lock:
            self._seen[info.id] = (wid, time.monotonic())
        return wid


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
