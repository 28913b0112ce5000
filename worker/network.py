"""The fetcher's network layer: resolve, check the address, connect to that very address.

``GuardedBackend`` is an ``httpcore`` network backend. For every new connection it
resolves the host itself (numeric forms are parsed, never resolved), refuses the
connection when any answer is not allowed by the ``AddressPolicy``, and then dials the
*validated* address, so that a second, different DNS answer cannot rebind the
connection to an internal host. TLS still verifies and sends SNI for the URL's host
name, because httpcore passes that name to ``start_tls``.

How the validated address is dialled is a parameter too (``Dialer``): production
connects a socket to it directly (``worker.streams``: no second lookup, no per-read
context managers); tests map public-looking addresses onto loopback test servers, which
keeps the guard on while the traffic stays on the machine.

Error handling: refusals raise ``SSRFBlocked`` and resolution failures ``DNSFailure``
before any socket is opened; connection errors stay httpcore's own (httpx maps them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import httpcore

from worker.addresses import AddressPolicy, IPAddress, parse_numeric_host
from worker.resolver import Resolver
from worker.streams import dial_tcp

SocketOption = httpcore.SOCKET_OPTION


class Dialer(Protocol):
    async def dial(self, address: IPAddress, port: int, connect_timeout: float | None,
                   socket_options: Iterable[SocketOption] | None
                   ) -> httpcore.AsyncNetworkStream:
        """Open a TCP connection to exactly ``address:port``."""
        ...


class TrioDialer:
    """Connects a socket to the address itself, with Trio (``worker.streams.dial_tcp``)."""

    async def dial(self, address: IPAddress, port: int, connect_timeout: float | None,
                   socket_options: Iterable[SocketOption] | None
                   ) -> httpcore.AsyncNetworkStream:
        return await dial_tcp(address, port, connect_timeout, socket_options)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve, check with the policy, dial the checked address. See the module docstring."""

    def __init__(self, resolver: Resolver, policy: AddressPolicy, dialer: Dialer) -> None:
        self._resolver = resolver
        self._policy = policy
        self._dialer = dialer
        self._sleeper = httpcore.TrioBackend()

    async def addresses_for(self, host: str) -> list[IPAddress]:
        """Every address of ``host``, all allowed by the policy, or ``SSRFBlocked``."""
        literal = parse_numeric_host(host)
        addresses = [literal] if literal is not None else await self._resolver.resolve(host)
        for address in addresses:
            self._policy.check(address, host)
        return addresses

    # httpcore's interface names the parameter ``timeout``.
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[SocketOption] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await self.addresses_for(host)
        return await self._dial_first(addresses, port, timeout, socket_options)

    async def _dial_first(self, addresses: list[IPAddress], port: int, timeout: float | None,  # noqa: ASYNC109
                          socket_options: Iterable[SocketOption] | None,
                          ) -> httpcore.AsyncNetworkStream:
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._dialer.dial(address, port, timeout, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def dial_configured(self, host: str, port: int, timeout: float | None,  # noqa: ASYNC109
                              socket_options: Iterable[SocketOption] | None,
                              ) -> httpcore.AsyncNetworkStream:
        """A connection to an endpoint of this worker's own configuration (its proxy):
        resolved and dialled like any host, but not checked against the policy."""
        literal = parse_numeric_host(host)
        addresses = [literal] if literal is not None else await self._resolver.resolve(host)
        return await self._dial_first(addresses, port, timeout, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[SocketOption] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self._sleeper.sleep(seconds)
