"""The fetcher's httpx client: the guarded network backend under httpx's own transport.

Resource handling: ``build_client`` returns an ``httpx.AsyncClient`` the caller closes
(``async with``); it owns one connection pool sized to the fetch concurrency.
"""

from __future__ import annotations

import httpcore
import httpx

from worker.decoding import accept_encoding
from worker.network import GuardedBackend
from worker.settings import FetchSettings


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport whose connection pool dials through a ``GuardedBackend``.

    httpx exposes no parameter for httpcore's ``network_backend``; the pool is rebuilt
    here with the same limits and the guarded backend. Everything else (request
    conversion, exception mapping, streaming) stays httpx's.
    """

    def __init__(self, backend: GuardedBackend, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False, retries=0)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def build_client(settings: FetchSettings, backend: GuardedBackend) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=settings.concurrency,
                          max_keepalive_connections=settings.concurrency,
                          keepalive_expiry=5.0)
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                            write=settings.read_timeout, pool=settings.deadline)
    headers = {"User-Agent": settings.user_agent, "Accept-Encoding": accept_encoding(),
               "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8"}
    return httpx.AsyncClient(transport=GuardedTransport(backend, limits), timeout=timeout,
                             headers=headers, follow_redirects=False, trust_env=False)
