"""Candidate URLs through an HTTP proxy (``http_proxy`` / ``https_proxy`` / ``no_proxy``).

``proxy_for`` tells which proxy, if any, an origin goes through (``ProxySettings``; the
``no_proxy`` rules as curl and Python's ``urllib`` read them: ``*`` for every host, a
name for itself and its subdomains, a leading dot ignored, ``host:port`` for that port
alone). ``http://`` URLs are sent to the
proxy in absolute form (``GET http://host/path``), ``https://`` URLs through a
``CONNECT host:port`` tunnel, TLS end to end (httpcore's proxy connections).

The SSRF guard through a proxy (``worker.transport`` does the first two):

- the worker still resolves every target host itself and checks each address with the
  policy before the request goes to the proxy: a name that resolves to a loopback,
  private or metadata address here ends ``ssrf_blocked`` and the proxy never hears of it;
  a numeric host is checked exactly; every redirect hop is checked again;
- the proxy itself is dialled without the check (``ProxyBackend``): it is this worker's
  own configuration and often on a private address;
- what cannot be checked: the proxy resolves the name again, on its own network. A
  different answer there (split-horizon DNS, a name rebound between the two lookups)
  reaches whatever the proxy can reach. The proxy's own rules on destinations guard
  its network; the worker's guard cannot.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import httpcore

from worker.network import GuardedBackend, SocketOption
from worker.settings import ProxySettings


def proxy_for(settings: ProxySettings, scheme: str, host: str, port: int | None
              ) -> httpcore.Proxy | None:
    """The proxy for ``scheme://host[:port]``, or None when it is reached directly."""
    url = settings.for_scheme(scheme)
    if url is None or _bypassed(settings.no_proxy, host, port):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    auth = None
    if parts.username is not None:
        auth = (unquote(parts.username), unquote(parts.password or ""))
    netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if parts.hostname and ":" in parts.hostname:  # IPv6
        netloc = f"[{parts.hostname}]" + ("" if parts.port is None else f":{parts.port}")
    return httpcore.Proxy(url=f"http://{netloc}", auth=auth)


def _bypassed(no_proxy: str, host: str, port: int | None) -> bool:
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        name, entry_port = _no_proxy_entry(entry)
        if entry_port is not None and entry_port != port:
            continue
        name = name.lstrip(".")
        if name in ("*", host) or host.endswith(f".{name}"):
            return True
    return False


def _no_proxy_entry(entry: str) -> tuple[str, int | None]:
    """(host, port or None) of a ``no_proxy`` entry: ``name``, ``name:port``, an IPv6
    address bare or in brackets (``[::1]:8080``)."""
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return address, int(port) if port.isdigit() else None
    name, colon, port = entry.partition(":")
    if colon and ":" not in port and port.isdigit():
        return name, int(port)
    return entry, None


class ProxyBackend(httpcore.AsyncNetworkBackend):
    """Dials the proxy (the only host a proxy pool connects to) without the policy."""

    def __init__(self, guarded: GuardedBackend) -> None:
        self._guarded = guarded

    # httpcore's interface names the parameter ``timeout``.
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[SocketOption] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        return await self._guarded.dial_configured(host, port, timeout, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[SocketOption] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self._guarded.sleep(seconds)
