"""HTTP client of the coordinator's API, for download workers and post-processing nodes.

``AsyncCoordinatorClient`` runs on any event loop httpx supports (Trio in the worker);
``CoordinatorClient`` is the blocking twin for the post-processing node and the CLI.
Both take an ``httpx`` transport so that tests can script the network.

Error handling: every failure is converted here into one of the ``ClientError`` types::

    ClientError
    ├── Unauthorized        401 / 403: a wrong or revoked token; retrying will not help
    ├── LeaseLost           409: the batch is no longer ours; discard the work
    ├── Throttled           429: not now (a quarantined worker); ``retry_after`` seconds
    ├── Rejected            422 / 413 / other 4xx: the request itself is wrong
    └── Unavailable         network failure, 5xx or a malformed answer: retry with
                            backoff, keep the batch

Response bodies are parsed with orjson, then validated, with the cyclic garbage collector
paused: a 10k-candidate lease allocates ~30k acyclic objects, whose collections took 25 ms
of the 40 ms a parse cost in a long-running client here (15 ms paused; pydantic's own JSON
parser took 27 ms where orjson took 12, both measured without the collections).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import orjson
from pydantic import BaseModel, ValidationError

from pairfarm import __version__
from pairfarm.protocol import (
    API_PREFIX,
    ROBOTS_MAX_ENTRIES,
    ROBOTS_MAX_ORIGINS,
    BatchState,
    DownloadLease,
    DownloadReport,
    FailReport,
    FarmStats,
    Heartbeat,
    HeartbeatResponse,
    LeaseRequest,
    PostprocessLease,
    PostprocessReport,
    RegisterRequest,
    RegisterResponse,
    RobotsCached,
    RobotsEntry,
    RobotsLookup,
    RobotsLookupResult,
    RobotsStore,
    RobotsStored,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

USER_AGENT = f"pairfarm/{__version__} (+https://github.com/pairfarm/pairfarm)"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
#: seconds an idle connection to the coordinator is kept for the next call: shorter than
#: the coordinator's ``--keep-alive`` (75 s), so that the client lets it go first, and
#: longer than the gaps between a working worker's calls
KEEPALIVE_S = 60.0
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                      keepalive_expiry=KEEPALIVE_S)
#: JSON bytes of robots.txt answers one store request carries at most (the coordinator
#: refuses request bodies over 1 MiB by default)
STORE_BYTES = 512 * 1024


class ClientError(Exception):
    """Base of the client's errors."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unauthorized(ClientError):
    """The coordinator refused the token (401) or its role (403)."""


class LeaseLost(ClientError):
    """The batch is not (or no longer) leased to us (409)."""


class Throttled(ClientError):
    """The coordinator refuses for a while (429); ``retry_after`` from its header."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class Rejected(ClientError):
    """The coordinator rejected the request as invalid (4xx other than the above)."""


class Unavailable(ClientError):
    """The coordinator could not be reached or failed (network error, 5xx)."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    status = response.status_code
    message = f"{response.request.method} {response.request.url.path}: {status} {detail}"
    if status in (401, 403):
        raise Unauthorized(message, status)
    if status == 409:
        raise LeaseLost(message, status)
    if status == 429:
        raise Throttled(message, status, _seconds(response.headers.get("retry-after")))
    if status >= 500:
        raise Unavailable(message, status)
    raise Rejected(message, status)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _headers(token: str | None) -> dict[str, str]:
    """Request headers; without a token only ``stats`` (read-only, public) can succeed."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return {**auth, "User-Agent": USER_AGENT}


def _body(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else model.model_dump(mode="json")


def _parse(response: httpx.Response, model: type[M]) -> M | None:
    _raise_for(response)
    if response.status_code == 204:
        return None
    try:
        with _collector_paused():
            return model.model_validate(orjson.loads(response.content))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        where = f"{response.request.method} {response.request.url.path}"
        raise Unavailable(f"{where}: malformed {model.__name__} from the coordinator: "
                          f"{exc}", response.status_code) from exc


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic GC while a body becomes objects (none of them in a cycle); the
    next allocation after this collects as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _must(value: M | None) -> M:
    if value is None:
        raise Rejected("the coordinator answered 204 where a body was expected")
    return value


class _Paths:
    register = f"{API_PREFIX}/register"
    stats = f"{API_PREFIX}/stats"
    robots = f"{API_PREFIX}/robots"
    robots_lookup = f"{API_PREFIX}/robots/lookup"

    @staticmethod
    def lease(kind: str) -> str:
        return f"{API_PREFIX}/{kind}/lease"

    @staticmethod
    def batch(kind: str, batch_id: int, action: str) -> str:
        return f"{API_PREFIX}/{kind}/{batch_id}/{action}"


class AsyncCoordinatorClient:
    """Async client. ``kind`` in the batch methods is ``"download"`` or ``"postprocess"``."""

    def __init__(self, base_url: str, token: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(token),
                                       transport=transport, timeout=timeout, limits=LIMITS)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, body: BaseModel | None,
                    model: type[M]) -> M | None:
        try:
            response = await self._http.request(method, path, json=_body(body))
        except httpx.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {exc!r}") from exc
        return _parse(response, model)

    async def register(self, name: str) -> RegisterResponse:
        req = RegisterRequest(name=name, version=__version__)
        return _must(await self._call("POST", _Paths.register, req, RegisterResponse))

    async def lease_download(self, max_size: int | None = None, *,
                             ahead: bool = False) -> DownloadLease | None:
        req = LeaseRequest(max_size=max_size, ahead=ahead)
        return await self._call("POST", _Paths.lease("download"), req, DownloadLease)

    async def lease_postprocess(self) -> PostprocessLease | None:
        req = LeaseRequest()
        return await self._call("POST", _Paths.lease("postprocess"), req, PostprocessLease)

    async def heartbeat(self, kind: str, batch_id: int, lease_token: str) -> HeartbeatResponse:
        path = _Paths.batch(kind, batch_id, "heartbeat")
        req = Heartbeat(lease_token=lease_token)
        return _must(await self._call("POST", path, req, HeartbeatResponse))

    async def complete(self, kind: str, batch_id: int,
                       report: DownloadReport | PostprocessReport) -> BatchState:
        path = _Paths.batch(kind, batch_id, "complete")
        return _must(await self._call("POST", path, report, BatchState))

    async def fail(self, kind: str, batch_id: int, report: FailReport) -> BatchState:
        path = _Paths.batch(kind, batch_id, "fail")
        return _must(await self._call("POST", path, report, BatchState))

    async def stats(self) -> FarmStats:
        return _must(await self._call("GET", _Paths.stats, None, FarmStats))

    async def robots_lookup(self, origins: list[str]) -> list[RobotsCached]:
        """The farm's valid robots.txt answers for ``origins`` (any number of them: asked
        ``ROBOTS_MAX_ORIGINS`` at a time, and again for those a response left out)."""
        found: list[RobotsCached] = []
        for part in _parts(origins, ROBOTS_MAX_ORIGINS):
            asked = part
            while asked:
                result = _must(await self._call("POST", _Paths.robots_lookup,
                                                RobotsLookup(origins=asked),
                                                RobotsLookupResult))
                found += result.entries
                asked = result.more if result.entries else []
        return found

    async def robots_store(self, entries: list[RobotsEntry]) -> int:
        """Share robots.txt answers this worker fetched; the number stored."""
        stored = 0
        for part in _store_groups(entries):
            req = RobotsStore(entries=part)
            stored += _must(await self._call("POST", _Paths.robots, req, RobotsStored)).stored
        return stored


def _parts(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _store_groups(entries: list[RobotsEntry]) -> list[list[RobotsEntry]]:
    """``entries`` in requests of at most ``ROBOTS_MAX_ENTRIES`` and ``STORE_BYTES`` of
    JSON (an answer larger than that alone)."""
    groups: list[list[RobotsEntry]] = [[]]
    size = 0
    for entry in entries:
        length = len(entry.model_dump_json())
        if groups[-1] and (size + length > STORE_BYTES
                           or len(groups[-1]) == ROBOTS_MAX_ENTRIES):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += length
    return [group for group in groups if group]


class CoordinatorClient:
    """Blocking client with the same methods as ``AsyncCoordinatorClient``."""

    def __init__(self, base_url: str, token: str | None = None, *,
                 transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(token),
                                  transport=transport, timeout=timeout, limits=LIMITS)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: BaseModel | None, model: type[M]) -> M | None:
        try:
            response = self._http.request(method, path, json=_body(body))
        except httpx.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {exc!r}") from exc
        return _parse(response, model)

    def register(self, name: str) -> RegisterResponse:
        req = RegisterRequest(name=name, version=__version__)
        return _must(self._call("POST", _Paths.register, req, RegisterResponse))

    def lease_download(self, max_size: int | None = None, *,
                       ahead: bool = False) -> DownloadLease | None:
        return self._call("POST", _Paths.lease("download"),
                          LeaseRequest(max_size=max_size, ahead=ahead), DownloadLease)

    def lease_postprocess(self) -> PostprocessLease | None:
        return self._call("POST", _Paths.lease("postprocess"), LeaseRequest(), PostprocessLease)

    def heartbeat(self, kind: str, batch_id: int, lease_token: str) -> HeartbeatResponse:
        path = _Paths.batch(kind, batch_id, "heartbeat")
        return _must(self._call("POST", path, Heartbeat(lease_token=lease_token),
                                HeartbeatResponse))

    def complete(self, kind: str, batch_id: int,
                 report: DownloadReport | PostprocessReport) -> BatchState:
        return _must(self._call("POST", _Paths.batch(kind, batch_id, "complete"), report,
                                BatchState))

    def fail(self, kind: str, batch_id: int, report: FailReport) -> BatchState:
        return _must(self._call("POST", _Paths.batch(kind, batch_id, "fail"), report,
                                BatchState))

    def stats(self) -> FarmStats:
        return _must(self._call("GET", _Paths.stats, None, FarmStats))
