"""The REST API (FastAPI): the endpoints of ``pairfarm.protocol``, auth, errors, limits.

Every endpoint is a plain function run in the server's thread pool (``--threads``), but
the download lease, which waits at a gate and then runs on threads of its own
(``LeaseGate``, ``--lease-concurrency``); each does one or two short transactions through
``Leases``. Authentication: ``Authorization: Bearer <token>``,
looked up by its sha256 and kept until a revocation is seen (``tokens.TokenCache``); the
role decides what the caller may do (admin may do all). The workers that called are
marked seen in bulk (``tokens.SeenCache``).
Read-only aggregates need no token: ``GET /api/v1/stats``, ``GET /metrics`` (Prometheus)
and the dashboard at ``GET /`` (``coordinator.dashboard``).

Error handling: the coordinator's errors map to HTTP statuses in ``STATUS``; request
validation gives 422 (the wire models are strict: no NUL, no number beyond PostgreSQL's
column, no ``Infinity``), and so does a value the database refuses all the same
(``DataError``); a body over the cap gives 413, declared or chunked; a database that cannot
be reached gives 503; every error body is ``{"error": <class>, "detail": <text>}``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from coordinator import dashboard, robots, tokens
from coordinator.errors import (
    AuthError,
    CoordinatorError,
    DatabaseUnavailable,
    Forbidden,
    InvalidReport,
    LeaseConflict,
    NotFound,
    Quarantined,
)
from coordinator.leases import DOWNLOAD, POSTPROCESS, Leases
from coordinator.locations import check_shard
from coordinator.metrics import (
    CoordinatorMetrics,
    make_metrics,
    shared_registry,
    stats_source,
)
from coordinator.reaper import Reaper
from coordinator.settings import CoordinatorSettings
from coordinator.stats import farm_stats
from coordinator.timing import ServerTiming
from pairfarm import __version__
from pairfarm.protocol import (
    API_PREFIX,
    BIGINT_MAX,
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
    RobotsLookup,
    RobotsLookupResult,
    RobotsStore,
    RobotsStored,
    Role,
)

STATUS: dict[type[CoordinatorError], int] = {
    Forbidden: 403, AuthError: 401, LeaseConflict: 409, NotFound: 404, InvalidReport: 422,
    DatabaseUnavailable: 503, Quarantined: 429,
}
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Scope]], Callable[[Scope], Awaitable[None]]],
                   Awaitable[None]]


def error_response(status: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether the size
    is declared (Content-Length) or only seen while streaming (chunked).

    The body is read here, up to the cap, and handed to the app in one piece: a request
    over the cap never reaches the app (where FastAPI would turn the error into a 400)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Scope]],
                       send: Callable[[Scope], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Callable[[], Awaitable[Scope]]) -> Scope | None:
        """The whole request body as one ``http.request`` message (or the disconnect that
        ended it); None when it grows over the cap."""
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Callable[[], Awaitable[Scope]],
                      send: Callable[[Scope], Awaitable[None]]) -> None:
        response = error_response(413, "body_too_large",
                                  f"request bodies are capped at {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(first: Scope, receive: Callable[[], Awaitable[Scope]]
            ) -> Callable[[], Awaitable[Scope]]:
    """A ``receive`` that answers ``first`` once, then whatever the server says next."""
    pending = [first]

    async def replay() -> Scope:
        return pending.pop() if pending else await receive()

    return replay


def _caller(request: Request) -> tokens.TokenInfo:
    """The caller's token, from ``Authorization: Bearer <token>``."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else None
    cache: tokens.TokenCache = request.app.state.tokens
    return cache.authenticate(request.app.state.engine, bearer)


Caller = Annotated[tokens.TokenInfo, Depends(_caller)]
#: a batch id in a path: a bigint
BatchId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]


def create_app(settings: CoordinatorSettings, engine: sa.Engine, *,
               reaper: bool = True, metrics_dir: str | None = None,
               on_exit: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app on ``engine``; with ``reaper`` it returns expired leases periodically
    while it runs. Each app has its own metrics registry (``app.state.metrics``); with
    ``metrics_dir`` (one of several server processes, prometheus_client in multiprocess
    mode) ``/metrics`` serves the counters of every process summed from that directory.
    ``on_exit`` runs when the app shuts down (after the reaper stopped)."""
    stats = stats_source(engine, settings.alive_window_s)
    metrics = make_metrics(stats)
    exposed = metrics.registry if metrics_dir is None else shared_registry(metrics_dir, stats)
    leases = Leases(engine, settings.lease, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        task = Reaper(leases, settings.reap_interval_s, metrics) if reaper else None
        if task:
            task.start()
        archiver = _auto_archiver(settings, engine)
        try:
            yield
        finally:
            if archiver:
                archiver.stop()
            if task:
                task.stop()
            if on_exit:
                on_exit()

    app = FastAPI(title="pairfarm coordinator", version=__version__, lifespan=lifespan)
    app.state.leases = leases
    app.state.engine = engine
    app.state.tokens = tokens.TokenCache(settings.revocation_check_s)
    app.state.metrics = metrics
    _install_errors(app)
    app.state.exposed = exposed
    _routes(app, settings, engine, leases, metrics)
    dashboard.mount(app)
    app.add_middleware(ServerTiming)  # inside BodyLimit: timed once the body is read
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def _auto_archiver(settings: CoordinatorSettings, engine: sa.Engine) -> Any:
    """The automatic archive's thread, started, when ``settings.archive`` asks for it."""
    if settings.archive is None or settings.archive.hot_max_candidates == 0:
        return None
    from coordinator.archive import AutoArchiver

    archiver = AutoArchiver(engine.url.render_as_string(hide_password=False), settings.archive)
    archiver.start()
    return archiver


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(CoordinatorError)
    async def coordinator_error(request: Request, exc: CoordinatorError) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, Quarantined):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return error_response(status, _snake(type(exc).__name__), str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(sa.exc.DataError)
    async def bad_value(request: Request, exc: sa.exc.DataError) -> JSONResponse:
        return error_response(422, "invalid_value",
                              f"the database refused a value: {str(exc.orig).strip()}")

    @app.exception_handler(sa.exc.OperationalError)
    async def db_down(request: Request, exc: sa.exc.OperationalError) -> JSONResponse:
        return error_response(503, "database_unavailable", str(exc.orig).strip())


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _routes(app: FastAPI, settings: CoordinatorSettings, engine: sa.Engine,
            leases: Leases, metrics: CoordinatorMetrics) -> None:
    seen = tokens.SeenCache(settings.touch_interval_s)

    def worker_id(info: tokens.TokenInfo, *roles: Role) -> int:
        tokens.require(info, *roles)
        return seen.worker_id(engine, info)

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"status": "ok"}

    @app.post(f"{API_PREFIX}/register")
    def register(body: RegisterRequest, info: Caller) -> RegisterResponse:
        wid = seen.touch(engine, info, body.name, body.version)
        lease = settings.lease
        return RegisterResponse(worker_id=wid, role=info.role, batch_size=lease.batch_size,
                                lease_ttl_s=lease.lease_ttl_s,
                                heartbeat_interval_s=lease.heartbeat_interval_s)

    gate = LeaseGate(settings.lease_concurrency)

    def lease_in_thread(body: LeaseRequest, info: tokens.TokenInfo) -> Response:
        wid = worker_id(info, Role.WORKER)
        with metrics.timed_lease(DOWNLOAD):
            lease = leases.lease_download_raw(wid, body.max_size, ahead=body.ahead)
        if lease is None:
            return Response(status_code=204)
        return Response(content=lease.to_json(), media_type="application/json")

    @app.post(f"{API_PREFIX}/download/lease", response_model=DownloadLease,
              responses={204: {"description": "nothing left to lease (for a lease-ahead: "
                                                 "nothing beyond this batch)"}})
    async def lease_download(body: LeaseRequest, info: Caller) -> Response:
        """At most ``--lease-concurrency`` download leases at once in this process, on
        threads of their own: the others wait here in turn, holding no thread and no
        connection, while heartbeats and completions go on in the shared pool."""
        return await gate.run(partial(lease_in_thread, body, info))

    @app.post(f"{API_PREFIX}/postprocess/lease", response_model=PostprocessLease,
              responses={204: {"description": "no written shard waits"}})
    def lease_postprocess(body: LeaseRequest, info: Caller) -> Response:
        wid = worker_id(info, Role.GPU)
        with metrics.timed_lease(POSTPROCESS):
            return _json(leases.lease_postprocess(wid))

    for kind, role in ((DOWNLOAD, Role.WORKER), (POSTPROCESS, Role.GPU)):
        _batch_routes(app, leases, metrics, kind=kind, role=role, worker_id=worker_id)

    @app.post(f"{API_PREFIX}/download/{{batch_id}}/complete")
    def complete_download(batch_id: BatchId, body: DownloadReport, info: Caller) -> BatchState:
        wid = worker_id(info, Role.WORKER)
        check_shard(body.shard, settings.shard_prefixes)
        with metrics.fenced(DOWNLOAD, "complete"):
            return leases.complete_download(batch_id, wid, body)

    @app.post(f"{API_PREFIX}/postprocess/{{batch_id}}/complete")
    def complete_postprocess(batch_id: BatchId, body: PostprocessReport,
                             info: Caller) -> BatchState:
        wid = worker_id(info, Role.GPU)
        with metrics.fenced(POSTPROCESS, "complete"):
            return leases.complete_postprocess(batch_id, wid, body)

    @app.post(f"{API_PREFIX}/robots/lookup")
    def robots_lookup(body: RobotsLookup, info: Caller) -> RobotsLookupResult:
        """The stored robots.txt answers of the origins asked (``coordinator.robots``)."""
        worker_id(info, Role.WORKER)
        return robots.lookup(engine, body.origins)

    @app.post(f"{API_PREFIX}/robots")
    def robots_store(body: RobotsStore, info: Caller) -> RobotsStored:
        """Robots.txt answers a worker fetched, shared with the others until they expire."""
        worker_id(info, Role.WORKER)
        return robots.store(engine, body)

    @app.get(f"{API_PREFIX}/stats")
    def stats() -> FarmStats:
        """The farm's figures; read-only aggregates, so no token is needed."""
        return farm_stats(engine, settings.alive_window_s)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        """Prometheus text exposition of ``app.state.metrics``, or of every server
        process's counters summed (no token needed)."""
        body = generate_latest(app.state.exposed)
        return Response(content=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class LeaseGate:
    """A first-come first-served limit on the download leases in flight in one process,
    made on first use (an anyio limiter belongs to the event loop that runs it)."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, work: Callable[[], Response]) -> Response:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)


def _json(model: PostprocessLease | None) -> Response:
    """204 for nothing; else the model's JSON (serialised once: FastAPI's response
    validation would check it a second time)."""
    if model is None:
        return Response(status_code=204)
    return Response(content=model.model_dump_json(), media_type="application/json")


def _batch_routes(app: FastAPI, leases: Leases, metrics: CoordinatorMetrics, *, kind: str,
                  role: Role, worker_id: Callable[..., int]) -> None:
    """Heartbeat and fail, the same for both kinds of client."""

    @app.post(f"{API_PREFIX}/{kind}/{{batch_id}}/heartbeat", name=f"{kind}_heartbeat")
    def heartbeat(batch_id: BatchId, body: Heartbeat, info: Caller) -> HeartbeatResponse:
        wid = worker_id(info, role)
        with metrics.fenced(kind, "heartbeat"):
            return leases.heartbeat(kind, batch_id, wid, body.lease_token)

    @app.post(f"{API_PREFIX}/{kind}/{{batch_id}}/fail", name=f"{kind}_fail")
    def fail(batch_id: BatchId, body: FailReport, info: Caller) -> BatchState:
        wid = worker_id(info, role)
        with metrics.fenced(kind, "fail"):
            return leases.fail(kind, batch_id, wid, body)
