"""The fetcher's HTTP client: one small httpcore pool per origin, dialling through the guard.

A single pool for hundreds of connections costs a scan of every connection on every
request (httpcore assigns requests to connections linearly); LAION-style batches touch
thousands of distinct hosts, each with a handful of requests, so one pool per origin
(capped at ``per_host`` connections, the same limit the host gate enforces) keeps that
scan short. Every pool dials through the same ``GuardedBackend`` and shares one TLS
context.

With a proxy configured (``FetchSettings.proxy``, ``worker.proxy``), an origin's pool
sends through it unless ``no_proxy`` names the host: such a pool dials the proxy alone
(``ProxyBackend``), and before each of its requests the target host is resolved and
checked by the guard (``GuardedBackend.addresses_for``), as a direct connection would.

``build_client`` puts a ``FetchClient`` in front of the pools: httpx's request and
response models and its transport interface, without ``httpx.AsyncClient``'s per-request
layers (cookie jar, auth flow, redirects, hooks), which the fetcher does not use.

Resource handling: ``build_client`` returns a ``FetchClient`` the caller closes
(``async with``); closing it closes every pool. A pool is dropped as soon as a response
ends and it holds no connection.

Error handling: httpcore's exceptions are mapped onto httpx's tree (``_mapped``), the
way httpx's own transport does, so callers see only httpx errors and the guard's own
``FetchFailure`` types (which pass through unchanged).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType

import httpcore
import httpx

from worker.decoding import accept_encoding
from worker.network import GuardedBackend
from worker.proxy import ProxyBackend, proxy_for
from worker.settings import SAFE_FORMATS, FetchSettings, ProxySettings

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
    (httpcore.ProxyError, httpx.ProxyError),  # the proxy refused a CONNECT
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)

_Origin = tuple[bytes, bytes, int | None]


_SOURCES = tuple(source for source, _ in _ERRORS)


def _mapped(exc: Exception) -> Exception:
    """The httpx error for an httpcore one (``exc`` itself when it is not httpcore's)."""
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(str(exc))
    return exc


class _Body(httpx.AsyncByteStream, AsyncIterator[bytes]):
    """The response body: httpcore's stream with its errors mapped.

    An iterator class, not an async generator, so that stopping early (a size cap, a
    deadline) leaves nothing for the garbage collector to finalize.
    """

    def __init__(self, response: httpcore.Response, on_close: Callable[[], None]) -> None:
        assert isinstance(response.stream, AsyncIterable)
        self._response = response
        self._parts = response.stream.__aiter__()
        self._on_close = on_close

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._parts.__anext__()
        except _SOURCES as exc:
            raise _mapped(exc) from exc

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        except _SOURCES as exc:
            raise _mapped(exc) from exc
        finally:
            self._on_close()


class OriginPoolTransport(httpx.AsyncBaseTransport):
    """One httpcore connection pool per (scheme, host, port); see the module docstring."""

    def __init__(self, backend: GuardedBackend, per_host: int,
                 keepalive_expiry: float = 5.0, proxy: ProxySettings | None = None) -> None:
        self._backend = backend
        self._to_proxy = ProxyBackend(backend)
        self._proxy = proxy or ProxySettings()
        self._per_host = per_host
        self._keepalive = keepalive_expiry
        self._ssl = httpx.create_ssl_context(trust_env=False)
        self._pools: dict[_Origin, httpcore.AsyncConnectionPool] = {}
        self._proxied: set[_Origin] = set()

    def _pool(self, origin: _Origin) -> httpcore.AsyncConnectionPool:
        pool = self._pools.get(origin)
        if pool is None:
            proxy = self._proxy_of(origin)
            if proxy is not None:
                self._proxied.add(origin)
            pool = self._pools[origin] = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl, max_connections=self._per_host,
                max_keepalive_connections=self._per_host, keepalive_expiry=self._keepalive,
                network_backend=self._backend if proxy is None else self._to_proxy,
                proxy=proxy)
        return pool

    def _proxy_of(self, origin: _Origin) -> httpcore.Proxy | None:
        scheme, host, port = origin
        return proxy_for(self._proxy, scheme.decode("ascii"), host.decode("ascii"), port)

    async def _check_proxied_target(self, origin: _Origin) -> None:
        """Through a proxy, the target's addresses are checked here (the proxy only
        resolves them again); a direct pool checks them when it dials."""
        if origin in self._proxied:
            await self._backend.addresses_for(origin[1].decode("ascii"))

    def _forget_if_idle(self, origin: _Origin) -> None:
        pool = self._pools.get(origin)
        if pool is not None and not pool.connections:
            del self._pools[origin]
            self._proxied.discard(origin)

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
        try:
            await self._check_proxied_target(origin)
            response = await pool.handle_async_request(core)
        except _SOURCES as exc:
            raise _mapped(exc) from exc
        body = _Body(response, lambda: self._forget_if_idle(origin))
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=body, extensions=response.extensions)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()

    def __len__(self) -> int:
        return len(self._pools)


class FetchClient:
    """GET requests sent straight to the ``OriginPoolTransport``, no ``httpx.AsyncClient``.

    The client layer does per request what the fetcher never needs: a cookie jar (every
    response's cookies extracted through ``urllib.request`` compatibility objects, then
    sent back to the host), an auth flow, redirect handling (the fetcher follows
    redirects itself, each hop through the guard), event hooks and a merge of the URL
    with a base URL. Here a request is an ``httpx.Request`` with the default headers and
    the timeouts, and the response is httpx's, its body an iterator of raw chunks.

    Resource handling: ``stream`` closes the response on exit; closing the client
    (``async with``) closes the transport and every pool.
    """

    def __init__(self, transport: OriginPoolTransport, headers: dict[str, str],
                 timeout: httpx.Timeout) -> None:
        self._transport = transport
        self._headers = httpx.Headers(headers)
        self._extensions = {"timeout": timeout.as_dict()}

    @asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[httpx.Response]:
        """The response to ``GET url``, its body not yet read (see ``raw_chunks``)."""
        request = httpx.Request("GET", url, headers=self._headers, extensions=self._extensions)
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    async def __aenter__(self) -> FetchClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._transport.aclose()


def raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body of a ``FetchClient`` response as it arrives, content coding untouched."""
    assert isinstance(response.stream, _Body)
    return response.stream


#: the media type a server answers for each Pillow format the worker may decode
_MEDIA_TYPES = {"WEBP": "image/webp", "PNG": "image/png", "JPEG": "image/jpeg",
                "GIF": "image/gif", "BMP": "image/bmp"}


def accept_header(formats: tuple[str, ...]) -> str:
    """``Accept`` naming only formats the worker decodes: a CDN that picks the format
    from this header (AVIF for ``image/avif``) must not send one the worker refuses."""
    named = [_MEDIA_TYPES[name] for name in formats if name in _MEDIA_TYPES]
    return ",".join([*named, "image/*;q=0.8"])


def build_client(settings: FetchSettings, backend: GuardedBackend, *,
                 formats: tuple[str, ...] = SAFE_FORMATS) -> FetchClient:
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                            write=settings.read_timeout, pool=settings.deadline)
    headers = {"Accept": accept_header(formats),
               "Accept-Encoding": accept_encoding(), "Connection": "keep-alive",
               "User-Agent": settings.user_agent}
    transport = OriginPoolTransport(backend, per_host=settings.per_host, proxy=settings.proxy)
    return FetchClient(transport, headers, timeout)
