"""The fetcher's httpx client: one small httpcore pool per origin, dialling through the guard.

A single pool for hundreds of connections costs a scan of every connection on every
request (httpcore assigns requests to connections linearly); LAION-style batches touch
thousands of distinct hosts, each with a handful of requests, so one pool per origin
(capped at ``per_host`` connections, the same limit the host gate enforces) keeps that
scan short. Every pool dials through the same ``GuardedBackend`` and shares one TLS
context.

Resource handling: ``build_client`` returns an ``httpx.AsyncClient`` the caller closes
(``async with``); closing it closes every pool. A pool is dropped as soon as a response
ends and it holds no connection.

Error handling: httpcore's exceptions are mapped onto httpx's tree (``_mapped``), the
way httpx's own transport does, so callers see only httpx errors and the guard's own
``FetchFailure`` types (which pass through unchanged).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import httpcore
import httpx

from worker.decoding import accept_encoding
from worker.network import GuardedBackend
from worker.settings import FetchSettings

#: httpcore error -> httpx error; leaves first, so the most specific one wins.
_ERRORS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)

_Origin = tuple[bytes, bytes, int | None]


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for source, target in _ERRORS:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _Body(httpx.AsyncByteStream, AsyncIterator[bytes]):
    """The response body: httpcore's stream with its errors mapped.

    An iterator class, not an async generator, so that stopping early (a size cap, a
    deadline) leaves nothing for the garbage collector to finalize.
    """

    def __init__(self, response: httpcore.Response, on_close: Callable[[], None]) -> None:
        self._response = response
        self._parts = response.aiter_stream()
        self._on_close = on_close

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        with _mapped():
            return await self._parts.__anext__()

    async def aclose(self) -> None:
        try:
            with _mapped():
                await self._response.aclose()
        finally:
            self._on_close()


class OriginPoolTransport(httpx.AsyncBaseTransport):
    """One httpcore connection pool per (scheme, host, port); see the module docstring."""

    def __init__(self, backend: GuardedBackend, per_host: int,
                 keepalive_expiry: float = 5.0) -> None:
        self._backend = backend
        self._per_host = per_host
        self._keepalive = keepalive_expiry
        self._ssl = httpx.create_ssl_context(trust_env=False)
        self._pools: dict[_Origin, httpcore.AsyncConnectionPool] = {}

    def _pool(self, origin: _Origin) -> httpcore.AsyncConnectionPool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl, max_connections=self._per_host,
                max_keepalive_connections=self._per_host,
                keepalive_expiry=self._keepalive, network_backend=self._backend)
        return pool

    def _forget_if_idle(self, origin: _Origin) -> None:
        pool = self._pools.get(origin)
        if pool is not None and not pool.connections:
            del self._pools[origin]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                             target=url.raw_path),
            headers=request.headers.raw, content=request.stream,
            extensions=request.extensions)
        pool = self._pool(origin)
        with _mapped():
            response = await pool.handle_async_request(core)
        body = _Body(response, lambda: self._forget_if_idle(origin))
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=body, extensions=response.extensions)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()

    def __len__(self) -> int:
        return len(self._pools)


def build_client(settings: FetchSettings, backend: GuardedBackend) -> httpx.AsyncClient:
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                            write=settings.read_timeout, pool=settings.deadline)
    headers = {"User-Agent": settings.user_agent, "Accept-Encoding": accept_encoding(),
               "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8"}
    transport = OriginPoolTransport(backend, per_host=settings.per_host)
    return httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers,
                             follow_redirects=False, trust_env=False)
