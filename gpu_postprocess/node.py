"""The post-processing node: lease a downloaded shard, score it, write outputs, complete.

Fenced like a download worker: every heartbeat, completion and failure carries the lease
token; a ``LeaseLost`` (409) at any point means the batch is no longer ours, and the work
is discarded (outputs are deterministic, so a re-run by the next holder overwrites them
with the same content).

Resource handling: one ``CoordinatorClient`` for the node's life; per batch a temporary
work folder (remote shards are fetched into it) and a heartbeat thread, both ended when
the batch ends, whatever the outcome. Every shard's end (completed, failed, lost), its
counts, duration and the device's peak memory go to the ``NodeMetrics`` it is given.

Error handling: ``ShardError`` (corrupt or inconsistent shard) and a report the
coordinator rejects are the batch's failure: reported with the reason, one of the batch's
post-processing attempts is spent. A failure that is this machine's own (``own_failure``:
its output location or scratch disk, its settings, a model that does not load, the device
or the host out of memory) is reported with cause ``worker``: the batch goes back to
``downloaded`` and no attempt is spent; after ``stop_after_failures`` of them in a row,
with no batch completed in between, the node stops (``NodeStopped``). An interrupt
(Ctrl-C, SIGTERM) gives the batch back unworked (``release=True``) and stops;
``Unauthorized`` stops the node; ``Unavailable`` is retried with backoff.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from gpu_postprocess.errors import (
    ModelLoadError,
    OutputError,
    PostprocessError,
    SettingsError,
)
from gpu_postprocess.metrics import NodeMetrics, ShardResult, build_metrics
from gpu_postprocess.outputs import Written, write_outputs
from gpu_postprocess.pipeline import Scorer, decide, score_shard
from gpu_postprocess.settings import NodeSettings, OutputSettings
from gpu_postprocess.shardio import Shard, open_shard
from pairfarm.client import CoordinatorClient, LeaseLost, Rejected, Unavailable
from pairfarm.protocol import FailCause, FailReport, PostprocessLease, PostprocessReport

log = logging.getLogger(__name__)
KIND = "postprocess"
T = TypeVar("T")
RETRIES = 5
#: failures that are this machine's own, not the shard's: its output location or scratch
#: disk (``OSError``), its settings, its models, its memory (CUDA: ``OutOfMemoryError``)
OWN_FAILURES = (
    OutputError, SettingsError, ModelLoadError, OSError, MemoryError, torch.OutOfMemoryError)
#: how PyTorch's CPU allocator words a failed allocation (a plain ``RuntimeError``)
CPU_OOM_MESSAGES = ("can't allocate memory", "not enough memory")


class NodeStopped(PostprocessError):
    """The node cannot go on: its batches keep failing on this machine."""


def own_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is this machine's failure rather than the shard's."""
    if isinstance(exc, OWN_FAILURES):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in CPU_OOM_MESSAGES)


class LeaseKeeper:
    """Heartbeats a lease from a background thread until stopped; ``check()`` raises
    ``LeaseLost`` in the caller's thread once the coordinator has said the lease is gone."""

    def __init__(self, client: CoordinatorClient, batch_id: int, lease_token: str,
                 interval_s: float) -> None:
        self._client, self._batch, self._token = client, batch_id, lease_token
        self._interval = interval_s
        self._stop = threading.Event()
        self._lost: LeaseLost | None = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{batch_id}",
                                        daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._client.heartbeat(KIND, self._batch, self._token)
            except LeaseLost as exc:
                self._lost = exc
                return
            except Unavailable as exc:
                log.warning("heartbeat of batch %d failed, will retry: %s", self._batch, exc)

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost


@dataclass
class BatchResult:
    batch_id: int
    written: Written
    report: PostprocessReport


def process_lease(scorer: Scorer, lease: PostprocessLease, out: OutputSettings, workdir: Path,
                  on_batch: Callable[[int], None]) -> tuple[Written, float]:
    """Fetch, score, decide and write one leased shard; returns outputs and seconds."""
    start = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"batch-{lease.batch_id}-") as tmp:
        shard = open_shard(lease.shard, Path(tmp))
        written = process_shard(scorer, shard, lease.batch_id, out, on_batch)
    return written, time.monotonic() - start


def process_shard(scorer: Scorer, shard: Shard, batch_id: int, out: OutputSettings,
                  on_batch: Callable[[int], None] | None = None) -> Written:
    scores = score_shard(scorer, shard, on_batch=on_batch)
    decisions = decide(shard, scores, scorer.thresholds)
    return write_outputs(shard, batch_id, scores, decisions, out_dir=out.out_dir)


def report_of(lease: PostprocessLease, written: Written, duration_s: float) -> PostprocessReport:
    s = written.summary
    return PostprocessReport(lease_token=lease.lease_token, kept=s["kept"], dropped=s["dropped"],
                             drop_reasons=s["drop_reasons"],
                             similarity_edges=s["similarity_edges"],
                             similarity_counts=s["similarity_counts"], outputs=written.paths,
                             duration_s=duration_s)


def with_retries(call: Callable[[], T], what: str, retries: int = RETRIES) -> T:
    """``call()``, retried with exponential backoff while the coordinator is unavailable."""
    for attempt in range(retries):
        try:
            return call()
        except Unavailable as exc:
            if attempt == retries - 1:
                raise
            delay = min(30.0, 0.5 * 2**attempt)
            log.warning("%s: %s; retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Node:
    """The lease loop. ``progress(total)`` returns the per-batch progress callback;
    ``metrics`` (a fresh registry by default) records every shard's end."""

    def __init__(self, client: CoordinatorClient, scorer: Scorer, settings: NodeSettings, *,
                 out: OutputSettings, heartbeat_s: float,
                 progress: Callable[[int, int], Callable[[int], None]],
                 metrics: NodeMetrics | None = None) -> None:
        self.client, self.scorer, self.settings, self.out = client, scorer, settings, out
        self.heartbeat_s = heartbeat_s
        self.progress = progress
        self.metrics = metrics or build_metrics()
        self._own_failures = 0

    def run(self) -> list[BatchResult]:
        done: list[BatchResult] = []
        while self.settings.max_batches is None or len(done) < self.settings.max_batches:
            lease = with_retries(self.client.lease_postprocess, "lease")
            if lease is None:
                if self.settings.exit_when_idle:
                    break
                time.sleep(self.settings.poll_interval_s)
                continue
            result = self.handle(lease)
            if result is not None:
                done.append(result)
        return done

    def handle(self, lease: PostprocessLease) -> BatchResult | None:
        """Work one lease; its result (None when lost or failed) is also in the metrics."""
        try:
            result = self._handle(lease)
        finally:
            self.metrics.record_memory(self.scorer.primary.device)
        if result is not None:
            self._own_failures = 0
            summary = result.report
            self.metrics.shard_completed(kept=summary.kept, dropped=summary.dropped,
                                         duration_s=summary.duration_s)
        return result

    def _handle(self, lease: PostprocessLease) -> BatchResult | None:
        log.info("leased batch %d (%d samples)", lease.batch_id, lease.count)
        try:
            with LeaseKeeper(self.client, lease.batch_id, lease.lease_token,
                             self.heartbeat_s) as keeper:
                tick = self.progress(lease.batch_id, lease.count)

                def on_batch(n: int) -> None:
                    keeper.check()
                    tick(n)

                written, duration = process_lease(self.scorer, lease, self.out,
                                                  self.settings.workdir, on_batch)
                keeper.check()
                report = report_of(lease, written, duration)
                with_retries(lambda: self.client.complete(KIND, lease.batch_id, report),
                             "complete")
        except LeaseLost as exc:
            log.warning("batch %d: lease lost, work discarded: %s", lease.batch_id, exc)
            self.metrics.shard_ended(ShardResult.LOST)
            return None
        except (*OWN_FAILURES, RuntimeError) as exc:
            if not own_failure(exc):
                raise
            self._failed_here(lease, f"{type(exc).__name__}: {exc}")
            return None
        except (PostprocessError, Rejected) as exc:
            # Rejected: the coordinator refused the report; the batch fails with its reason
            # rather than the node exiting and being handed the same batch again.
            log.error("batch %d failed: %s", lease.batch_id, exc)
            self._fail(lease, str(exc), release=False)
            self.metrics.shard_ended(ShardResult.FAILED)
            return None
        except (KeyboardInterrupt, SystemExit):
            self._fail(lease, "node interrupted", release=True)
            raise
        return BatchResult(lease.batch_id, written, report)

    def _failed_here(self, lease: PostprocessLease, reason: str) -> None:
        """The batch failed for this machine's own reasons: give it back without spending
        an attempt; stop after ``stop_after_failures`` in a row."""
        log.error("batch %d failed on this machine: %s", lease.batch_id, reason)
        self._fail(lease, reason, release=False, cause=FailCause.WORKER)
        self.metrics.shard_ended(ShardResult.FAILED)
        self._own_failures += 1
        if self._own_failures >= self.settings.stop_after_failures:
            raise NodeStopped(f"stopping: {self._own_failures} batches in a row failed on "
                              f"this machine: {reason}")

    def _fail(self, lease: PostprocessLease, reason: str, *, release: bool,
              cause: FailCause = FailCause.BATCH) -> None:
        body = FailReport(lease_token=lease.lease_token, reason=reason[:2000], release=release,
                          cause=cause)
        try:
            self.client.fail(KIND, lease.batch_id, body)
        except (LeaseLost, Unavailable) as exc:
            log.warning("batch %d: could not report the failure: %s", lease.batch_id, exc)


def node_name() -> str:
    return f"{socket.gethostname()}-gpu"
