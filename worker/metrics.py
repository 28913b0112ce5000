"""The download worker's Prometheus metrics: one registry per process, built here.

``build_metrics()`` makes a ``CollectorRegistry`` holding the worker's families (and
prometheus_client's process and platform collectors) wrapped in ``WorkerMetrics``, whose
methods the pipeline calls; there are no module-level metric objects. Metrics are always
recorded; ``serve_metrics`` exposes them over HTTP only when a port is given::

    pairfarm_worker_requests_in_flight            gauge     URLs inside Fetcher.fetch
    pairfarm_worker_url_outcomes_total{outcome}   counter   one per written sample
    pairfarm_worker_downloaded_bytes_total        counter   bytes on the wire
    pairfarm_worker_fetch_duration_seconds        histogram one URL, redirects included
    pairfarm_worker_decode_duration_seconds       histogram decode + resize of one image
    pairfarm_worker_batches_total{result}         counter   completed|released|lost|failed
    pairfarm_worker_idle_seconds_total            counter   no candidate in flight
    pairfarm_worker_idle_fraction                 gauge     idle seconds / seconds running

Resource handling: ``serve_metrics`` runs prometheus_client's HTTP server in a daemon
thread (nothing blocks the Trio loop) and shuts it down when its ``with`` block ends.

Error handling: a port that cannot be bound is a ``SettingsError``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import StrEnum

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from pairfarm.metrics_http import exported_names, new_registry, serve_registry
from pairfarm.outcomes import ALL_OUTCOMES
from worker.errors import SettingsError
from worker.settings import MetricsSettings

FETCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
DECODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class BatchResult(StrEnum):
    """How a batch ended, as ``pairfarm_worker_batches_total`` labels it."""

    COMPLETED = "completed"
    RELEASED = "released"
    LOST = "lost"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class WorkerMetrics:
    """The worker's metric families on their registry, and what the pipeline records."""

    registry: CollectorRegistry
    in_flight: Gauge
    outcomes: Counter
    wire_bytes: Counter
    fetch_seconds: Histogram
    decode_seconds: Histogram
    batches: Counter
    idle_seconds: Counter
    idle_fraction: Gauge

    @contextmanager
    def fetching(self) -> Iterator[None]:
        """One URL in flight; its duration is observed unless it is cancelled."""
        self.in_flight.inc()
        start = trio.current_time()
        try:
            yield
        except Exception:  # a FetchFailure is a fetch too; trio.Cancelled is not caught
            self.fetch_seconds.observe(trio.current_time() - start)
            raise
        else:
            self.fetch_seconds.observe(trio.current_time() - start)
        finally:
            self.in_flight.dec()

    def add_bytes(self, count: int) -> None:
        self.wire_bytes.inc(count)

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Times one decode + resize (called in the decode thread: wall clock)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.decode_seconds.observe(time.perf_counter() - start)

    def outcome(self, outcome: str) -> None:
        self.outcomes.labels(outcome=outcome).inc()

    def batch(self, result: BatchResult) -> None:
        self.batches.labels(result=result.value).inc()


def build_metrics() -> WorkerMetrics:
    """A fresh registry with every family (labelled series start at 0)."""
    registry = new_registry()
    metrics = WorkerMetrics(
        registry=registry,
        in_flight=Gauge("pairfarm_worker_requests_in_flight",
                        "URLs being fetched (waiting for a per-host slot included).",
                        registry=registry),
        outcomes=Counter("pairfarm_worker_url_outcomes", "Candidates written, by outcome.",
                         ["outcome"], registry=registry),
        wire_bytes=Counter("pairfarm_worker_downloaded_bytes",
                           "Response body bytes received on the wire.", registry=registry),
        fetch_seconds=Histogram("pairfarm_worker_fetch_duration_seconds",
                                "Seconds to fetch one URL, redirects and retries included.",
                                buckets=FETCH_BUCKETS, registry=registry),
        decode_seconds=Histogram("pairfarm_worker_decode_duration_seconds",
                                 "Seconds to decode and resize one image.",
                                 buckets=DECODE_BUCKETS, registry=registry),
        batches=Counter("pairfarm_worker_batches", "Batches by how they ended.", ["result"],
                        registry=registry),
        idle_seconds=Counter("pairfarm_worker_idle_seconds",
                             "Seconds with no candidate in flight (between batches too).",
                             registry=registry),
        idle_fraction=Gauge("pairfarm_worker_idle_fraction",
                            "Share of the run loop's time with no candidate in flight.",
                            registry=registry))
    _start_series(metrics)
    return metrics


def _start_series(metrics: WorkerMetrics) -> None:
    for outcome in ALL_OUTCOMES:
        metrics.outcomes.labels(outcome=outcome)
    for result in BatchResult:
        metrics.batches.labels(result=result.value)


@contextmanager
def serve_metrics(metrics: WorkerMetrics, settings: MetricsSettings) -> Iterator[int | None]:
    """Serve ``/metrics`` while the block runs; yields the bound port (None when off)."""
    with ExitStack() as stack:
        try:
            port = stack.enter_context(
                serve_registry(metrics.registry, settings.port, settings.host))
        except OSError as exc:
            raise SettingsError(f"cannot serve metrics on {settings.host}:{settings.port}: "
                                f"{exc}") from exc
        yield port


def metric_names() -> set[str]:
    """The sample names a fresh registry exports, as Prometheus sees them."""
    return exported_names(build_metrics().registry)
