"""robots.txt answers shared by the farm's download workers (table ``robots_txt``).

A worker that needs an origin's robots.txt asks here first (``lookup``); when no valid
answer is stored it fetches the file itself and stores what it found (``store``), so an
origin's robots.txt is fetched about once per farm per TTL, not once per worker. The
coordinator keeps the workers' answers as given (rule lines, kind, status) with their
expiry; it never fetches anything itself.

A lookup answers at most ``MAX_RESPONSE_BYTES`` of bodies: the origins left out are
listed in ``more`` (the worker asks again for them), so a response stays small however
large the stored files are (each at most ``ROBOTS_MAX_BYTES``).

Error handling: database errors propagate (the API maps them to 503 / 422).
"""

from __future__ import annotations

import sqlalchemy as sa

from coordinator.queries import Q
from pairfarm.protocol import (
    RobotsCached,
    RobotsEntry,
    RobotsLookupResult,
    RobotsStore,
    RobotsStored,
)

#: bytes of robots.txt bodies one lookup answers at most (the rest: ``more``)
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: expired answers deleted per store
PURGE_PER_STORE = 500


def lookup(engine: sa.Engine, origins: list[str], *,
           max_bytes: int = MAX_RESPONSE_BYTES) -> RobotsLookupResult:
    """The valid stored answers of ``origins`` (an origin without one is absent)."""
    with engine.connect() as conn:
        rows = conn.execute(Q.robots_lookup, {"origins": sorted(set(origins))}).all()
    entries: list[RobotsCached] = []
    more: list[str] = []
    size = 0
    for row in rows:
        size += len(row.body)
        if entries and size > max_bytes:
            more.append(row.origin)
            continue
        entries.append(RobotsCached(origin=row.origin, kind=row.kind, status=row.status,
                                    body=row.body, expires_in_s=row.expires_in_s))
    return RobotsLookupResult(entries=entries, more=more)


def store(engine: sa.Engine, request: RobotsStore) -> RobotsStored:
    """Store (or replace) the answers; the last answer given for an origin wins."""
    latest = list({entry.origin: entry for entry in request.entries}.values())
    with engine.begin() as conn:
        conn.execute(Q.robots_store, _columns(latest))
        conn.execute(Q.robots_purge_expired, {"n": PURGE_PER_STORE})
    return RobotsStored(stored=len(latest))


def _columns(entries: list[RobotsEntry]) -> dict[str, list[object]]:
    return {"origins": [e.origin for e in entries], "kinds": [e.kind.value for e in entries],
            "statuses": [e.status for e in entries], "bodies": [e.body for e in entries],
            "ttls": [e.ttl_s for e in entries]}
