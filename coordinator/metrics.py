"""The coordinator's Prometheus metrics, served at ``GET /metrics``.

``make_metrics`` builds one ``CollectorRegistry`` per app (no module-level metric objects)
holding:

- in-process counters and a histogram, counted at the API and reaper boundary: leases
  handed out, completions, failures, expired leases, fencing rejections (409) and the
  time to serve a lease request;
- ``FarmCollector``, which reads ``FarmStats`` (``coordinator.stats``: aggregates over the
  batches table, never the candidates) at scrape time and yields the farm's figures;
- prometheus_client's ``ProcessCollector`` and ``PlatformCollector``.

Error handling: a scrape while the database is unreachable logs a warning and leaves the
database-derived families out; the in-process ones are still served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coordinator.errors import LeaseConflict
from pairfarm.metrics_http import exported_names, new_registry
from pairfarm.outcomes import ALL_OUTCOMES
from pairfarm.protocol import BatchStatus, FarmStats, Role

log = logging.getLogger(__name__)

KINDS = ("download", "postprocess")
FENCED_ACTIONS = ("heartbeat", "complete", "fail")
#: how a download lease found nothing: the empty-queue hold answered, or a transaction looked
EMPTY_ANSWERS = ("held", "looked")
CANDIDATE_STATES = ("unbatched", *(s.value for s in BatchStatus))
LEASE_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

StatsSource = Callable[[], FarmStats]


@dataclass(frozen=True)
class CoordinatorMetrics:
    """The registry and the in-process metrics the API and the reaper count into."""

    registry: CollectorRegistry
    leases: Counter
    completions: Counter
    failures: Counter
    expiries: Counter
    fencing_rejections: Counter
    empty_leases: Counter
    lease_duration: Histogram

    @contextmanager
    def timed_lease(self, kind: str) -> Iterator[None]:
        """Time one lease request (whether it hands out a batch or answers 204)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.lease_duration.labels(kind=kind).observe(time.perf_counter() - start)

    @contextmanager
    def fenced(self, kind: str, action: str) -> Iterator[None]:
        """Count a ``LeaseConflict`` (the API's 409) raised inside, and let it go on."""
        try:
            yield
        except LeaseConflict:
            self.fencing_rejections.labels(kind=kind, action=action).inc()
            raise


def make_metrics(stats: StatsSource | None = None) -> CoordinatorMetrics:
    """A fresh registry; with ``stats`` it also yields the farm's figures at scrape time."""
    registry = new_registry()
    metrics = CoordinatorMetrics(
        registry=registry,
        leases=Counter("pairfarm_leases_total", "Leases handed out by this coordinator.",
                       ["kind"], registry=registry),
        completions=Counter("pairfarm_completions_total",
                            "Completion reports accepted by this coordinator.", ["kind"],
                            registry=registry),
        failures=Counter("pairfarm_failures_total",
                         "Fail calls accepted (released or failed) by this coordinator.",
                         ["kind"], registry=registry),
        expiries=Counter("pairfarm_lease_expiries_total",
                         "Expired leases the reaper took back.", ["kind"], registry=registry),
        fencing_rejections=Counter(
            "pairfarm_fencing_rejections_total",
            "Heartbeat, complete or fail calls refused with 409 (not the caller's lease).",
            ["kind", "action"], registry=registry),
        empty_leases=Counter(
            "pairfarm_empty_leases_total",
            "Download leases answered 204 because nothing was left to lease.",
            ["answered"], registry=registry),
        lease_duration=Histogram("pairfarm_lease_duration_seconds",
                                 "Time to serve one lease request.", ["kind"],
                                 buckets=LEASE_SECONDS_BUCKETS, registry=registry),
    )
    _zero(metrics)
    if stats is not None:
        registry.register(FarmCollector(stats))
    return metrics


def shared_registry(metrics_dir: str, stats: StatsSource) -> CollectorRegistry:
    """What ``/metrics`` serves when several server processes share the port (a scrape
    reaches any one of them): the counters and histogram of every process, summed from
    the files prometheus_client writes in ``metrics_dir`` (its multiprocess mode; a dead
    process's counts stay in the sums), ``python_info``, and the farm's figures.
    ``process_*`` is left out: it would describe whichever process answered."""
    from prometheus_client import PlatformCollector
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    PlatformCollector(registry=registry)
    registry.register(FarmCollector(stats))
    return registry


def _zero(metrics: CoordinatorMetrics) -> None:
    """Create every label combination, so that each series exists (at 0) from the start."""
    for kind in KINDS:
        for counter in (metrics.leases, metrics.completions, metrics.failures,
                        metrics.expiries):
            counter.labels(kind=kind)
        metrics.lease_duration.labels(kind=kind)
        for action in FENCED_ACTIONS:
            metrics.fencing_rejections.labels(kind=kind, action=action)
    for answered in EMPTY_ANSWERS:
        metrics.empty_leases.labels(answered=answered)


def stats_source(engine: sa.Engine, alive_window_s: float) -> StatsSource:
    """Read ``FarmStats`` from ``engine`` (at each scrape)."""
    from coordinator.stats import farm_stats

    return lambda: farm_stats(engine, alive_window_s)


class FarmCollector(Collector):
    """The database-derived families, from one ``FarmStats`` read per scrape."""

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._stats()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: cannot read the farm's figures: %s", exc)
            return []
        return farm_families(stats)


def farm_families(stats: FarmStats) -> list[Metric]:
    return [_candidates(stats), _batches(stats), _outcomes(stats), _bytes(stats),
            _workers(stats), _quarantined(stats), _samples(stats), _similarity(stats)]


def _candidates(stats: FarmStats) -> Metric:
    family = GaugeMetricFamily("pairfarm_candidates", "Candidates by the state of their batch.",
                               labels=["state"])
    for state in CANDIDATE_STATES:
        family.add_metric([state], stats.candidates_by_status.get(state, 0))
    return family


def _batches(stats: FarmStats) -> Metric:
    family = GaugeMetricFamily("pairfarm_batches", "Batches by state.", labels=["state"])
    for state in BatchStatus:
        family.add_metric([state.value], stats.batches.get(state.value, 0))
    return family


def _outcomes(stats: FarmStats) -> Metric:
    family = CounterMetricFamily("pairfarm_url_outcomes",
                                 "URLs of the completed download reports, by outcome class.",
                                 labels=["outcome"])
    for outcome in sorted({*ALL_OUTCOMES, *stats.outcomes}):
        family.add_metric([outcome], stats.outcomes.get(outcome, 0))
    return family


def _bytes(stats: FarmStats) -> Metric:
    return CounterMetricFamily("pairfarm_downloaded_bytes",
                               "Bytes downloaded, from the completed download reports.",
                               value=stats.bytes_downloaded)


def _workers(stats: FarmStats) -> Metric:
    family = GaugeMetricFamily("pairfarm_workers_alive",
                               "Clients seen within the alive window, by role.",
                               labels=["role"])
    for role in Role:
        family.add_metric([role.value], sum(1 for w in stats.workers if w.role is role))
    return family


def _quarantined(stats: FarmStats) -> Metric:
    """Clients the coordinator refuses leases to now (their batches kept failing)."""
    return GaugeMetricFamily(
        "pairfarm_workers_quarantined",
        "Clients seen within the alive window that are quarantined now (no lease).",
        value=sum(1 for w in stats.workers if w.quarantined_until is not None))


def _samples(stats: FarmStats) -> Metric:
    family = CounterMetricFamily("pairfarm_postprocess_samples",
                                 "Samples post-processing kept or dropped.",
                                 labels=["decision"])
    family.add_metric(["kept"], stats.kept)
    family.add_metric(["dropped"], stats.dropped)
    return family


def _similarity(stats: FarmStats) -> Metric:
    """The summed report histograms as cumulative buckets (``le`` = each bin's upper edge);
    the sum is estimated from the bins' midpoints."""
    edges, counts = stats.similarity.edges, stats.similarity.counts
    buckets: list[tuple[str, float]] = []
    running = 0
    for upper, count in zip(edges[1:], counts, strict=True):
        running += count
        buckets.append((_le(upper), running))
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", running))
    midpoint_sum = sum((lo + hi) / 2 * n for lo, hi, n in zip(edges, edges[1:], counts,
                                                              strict=False))
    return HistogramMetricFamily("pairfarm_similarity",
                                 "CLIP image-text similarity of the post-processed samples.",
                                 buckets=buckets, sum_value=midpoint_sum)


def _le(upper: float) -> str:
    return "+Inf" if upper == float("inf") else repr(float(upper))


def metric_names() -> set[str]:
    """The sample names a coordinator's registry exports, as Prometheus sees them."""
    empty = FarmStats(candidates_total=0, candidates_pending=0, batches={}, outcomes={},
                      bytes_downloaded=0, kept=0, dropped=0, workers_alive=0)
    return exported_names(make_metrics(lambda: empty).registry)
