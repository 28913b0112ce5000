"""Name resolution for the fetcher: the system resolver with a timeout, and a per-batch cache.

A resolver is anything with ``async resolve(host) -> list[IPAddress]`` that raises
``DNSFailure``. The fetcher takes one as a parameter, so tests pass a resolver that maps
fake public names to addresses of their choosing while the SSRF guard stays on.

Resource handling: ``SystemResolver`` runs ``getaddrinfo`` in a worker thread through
``trio.socket.getaddrinfo``; a lookup that outlives its timeout is abandoned (the thread
finishes on its own, its answer is dropped). ``CachingResolver`` keeps one answer (or one
failure) per name for its own lifetime: the worker makes a fresh one per batch.

Error handling: ``socket.gaierror``, ``OSError`` and the timeout become ``DNSFailure``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol

import trio

from worker.addresses import IPAddress
from worker.errors import DNSFailure


class Resolver(Protocol):
    async def resolve(self, host: str) -> list[IPAddress]:
        """The addresses of ``host``, in the resolver's order; raise ``DNSFailure``."""
        ...


class SystemResolver:
    """The operating system's resolver (``getaddrinfo``), bounded by ``timeout`` seconds."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout

    async def resolve(self, host: str) -> list[IPAddress]:
        with trio.move_on_after(self._timeout):
            return await self._lookup(host)
        raise DNSFailure(f"{host}: no answer within {self._timeout:g}s")

    async def _lookup(self, host: str) -> list[IPAddress]:
        try:
            infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise DNSFailure(f"{host}: {exc}") from exc
        addresses = _unique(ipaddress.ip_address(info[4][0]) for info in infos)
        if not addresses:
            raise DNSFailure(f"{host}: no address")
        return addresses


def _unique(addresses: object) -> list[IPAddress]:
    seen: dict[IPAddress, None] = {}
    for address in addresses:  # type: ignore[attr-defined]
        seen.setdefault(address)
    return list(seen)


class CachingResolver:
    """Caches another resolver's answers and failures; one lookup in flight per name."""

    def __init__(self, inner: Resolver) -> None:
        self._inner = inner
        self._answers: dict[str, list[IPAddress] | DNSFailure] = {}
        self._pending: dict[str, trio.Event] = {}

    async def resolve(self, host: str) -> list[IPAddress]:
        key = host.lower()
        while key not in self._answers:
            if key in self._pending:
                await self._pending[key].wait()
                continue
            await self._fill(key)
        answer = self._answers[key]
        if isinstance(answer, DNSFailure):
            raise DNSFailure(answer.detail)
        return answer

    async def _fill(self, key: str) -> None:
        done = self._pending[key] = trio.Event()
        try:
            self._answers[key] = await self._inner.resolve(key)
        except DNSFailure as exc:
            self._answers[key] = exc
        finally:
            del self._pending[key]
            done.set()

    def __len__(self) -> int:
        return len(self._answers)
