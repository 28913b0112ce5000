"""The post-processing node's Prometheus metrics: one registry per process, built here.

``build_metrics()`` makes a ``CollectorRegistry`` holding the node's families (and
prometheus_client's process and platform collectors) wrapped in ``NodeMetrics``, whose
methods ``Node`` calls once per shard; there are no module-level metric objects::

    pairfarm_postprocess_node_samples_total{decision}   counter   kept|dropped rows
    pairfarm_postprocess_samples_per_second             gauge     rows / seconds, last shard
    pairfarm_postprocess_shard_duration_seconds         histogram fetch + score + write
    pairfarm_postprocess_shards_total{result}           counter   completed|failed|lost
    pairfarm_postprocess_device_memory_bytes{device}    gauge     peak: CUDA allocator / RSS

Imports prometheus_client only; torch is imported when a CUDA device's memory is read.

Resource handling: ``serve_metrics`` runs prometheus_client's HTTP server in a daemon
thread and shuts it down when its ``with`` block ends.

Error handling: a port that cannot be bound is a ``SettingsError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from gpu_postprocess.errors import SettingsError
from pairfarm.metrics_http import exported_names, new_registry, serve_registry
from pairfarm.rss import peak_rss_bytes

SHARD_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


class ShardResult(StrEnum):
    """How a leased shard ended, as ``pairfarm_postprocess_shards_total`` labels it."""

    COMPLETED = "completed"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True, kw_only=True)
class NodeMetrics:
    """The node's metric families on their registry, and what the node records."""

    registry: CollectorRegistry
    samples: Counter
    samples_per_second: Gauge
    shard_seconds: Histogram
    shards: Counter
    device_memory: Gauge

    def shard_completed(self, *, kept: int, dropped: int, duration_s: float) -> None:
        self.samples.labels(decision="kept").inc(kept)
        self.samples.labels(decision="dropped").inc(dropped)
        self.shard_seconds.observe(duration_s)
        self.samples_per_second.set((kept + dropped) / max(duration_s, 1e-9))
        self.shard_ended(ShardResult.COMPLETED)

    def shard_ended(self, result: ShardResult) -> None:
        self.shards.labels(result=result.value).inc()

    def record_memory(self, device: Any) -> None:
        """Peak memory of ``device`` (a ``torch.device``): the CUDA allocator's on cuda,
        the process's peak resident set elsewhere."""
        if device.type == "cuda":
            label, used = _cuda_peak(device)
        else:
            label, used = device.type, peak_rss_bytes()
        self.device_memory.labels(device=label).set(used)


def _cuda_peak(device: Any) -> tuple[str, int]:
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index}", int(torch.cuda.max_memory_allocated(index))


def build_metrics() -> NodeMetrics:
    """A fresh registry with every family (labelled series start at 0)."""
    registry = new_registry()
    metrics = NodeMetrics(
        registry=registry,
        samples=Counter("pairfarm_postprocess_node_samples",
                        "Shard rows decided by this node, kept or dropped.", ["decision"],
                        registry=registry),
        samples_per_second=Gauge("pairfarm_postprocess_samples_per_second",
                                 "Rows per second over the last completed shard.",
                                 registry=registry),
        shard_seconds=Histogram("pairfarm_postprocess_shard_duration_seconds",
                                "Seconds per completed shard: fetch, score and write.",
                                buckets=SHARD_BUCKETS, registry=registry),
        shards=Counter("pairfarm_postprocess_shards", "Leased shards by how they ended.",
                       ["result"], registry=registry),
        device_memory=Gauge("pairfarm_postprocess_device_memory_bytes",
                            "Peak memory: torch.cuda.max_memory_allocated on cuda, the "
                            "process's peak RSS on cpu.", ["device"], registry=registry))
    _start_series(metrics)
    return metrics


def _start_series(metrics: NodeMetrics) -> None:
    for decision in ("kept", "dropped"):
        metrics.samples.labels(decision=decision)
    for result in ShardResult:
        metrics.shards.labels(result=result.value)


@contextmanager
def serve_metrics(metrics: NodeMetrics, port: int | None, host: str) -> Iterator[int | None]:
    """Serve ``/metrics`` while the block runs (``port`` None: off, 0: any free port);
    yields the bound port."""
    with ExitStack() as stack:
        try:
            bound = stack.enter_context(serve_registry(metrics.registry, port, host))
        except OSError as exc:
            raise SettingsError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        yield bound


def metric_names() -> set[str]:
    """The sample names a fresh registry exports, as Prometheus sees them."""
    return exported_names(build_metrics().registry)
