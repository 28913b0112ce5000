"""A process's Prometheus registry, serving it, and the sample names it exports; shared by
the coordinator, the worker and the post-processing node (each builds its own registry).
Imports prometheus_client only when called.

Resource handling: ``serve_registry`` runs prometheus_client's HTTP server in a daemon
thread and shuts it down and joins it when its ``with`` block ends.
Error handling: a port that cannot be bound raises ``OSError``; callers turn it into their
component's settings error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def new_registry() -> Any:
    """A fresh ``CollectorRegistry`` with prometheus_client's process and platform
    collectors (``process_resident_memory_bytes``, ``python_info``, ...) on it."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


@contextmanager
def serve_registry(registry: Any, port: int | None, host: str) -> Iterator[int | None]:
    """Serve ``/metrics`` of ``registry`` while the block runs (``port`` None: off, 0: any
    free port); yields the bound port."""
    if port is None:
        yield None
        return
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, host, registry=registry)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def exported_names(registry: Any) -> set[str]:
    """The sample names ``registry`` exports, as Prometheus sees them."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(_sample_names(family.name, family.type))
    return names


def _sample_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {f"{name}_sum", f"{name}_count"}
    return {name}
