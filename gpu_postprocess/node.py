"""The post-processing node: lease a downloaded shard, score it, write outputs, complete.

Fenced like a download worker: every heartbeat, completion and failure carries the lease
token; a ``LeaseLost`` (409) at any point means the batch is no longer ours, and the work
is discarded (outputs are deterministic, so a re-run by the next holder overwrites them
with the same content).

Resource handling: one ``CoordinatorClient`` for the node's life; per batch a temporary
work folder (remote shards are fetched into it) and a heartbeat thread, both ended when
the batch ends, whatever the outcome. Every shard's end (completed, failed, lost), its
counts, duration and the device's peak memory go to the ``NodeMetrics`` it is given.

Error handling: ``ShardError`` (corrupt or inconsistent shard) and ``ModelLoadError`` /
``OutputError`` while processing report the batch as failed with the reason; an
interrupt (Ctrl-C, SIGTERM) gives the batch back unworked (``release=True``) and stops;
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

from gpu_postprocess.errors import PostprocessError
from gpu_postprocess.metrics import NodeMetrics, ShardResult, build_metrics
from gpu_postprocess.outputs import Written, write_outputs
from gpu_postprocess.pipeline import Scorer, decide, score_shard
from gpu_postprocess.settings import NodeSettings, OutputSettings
from gpu_postprocess.shardio import Shard, open_shard
from pairfarm.client import CoordinatorClient, LeaseLost, Rejected, Unavailable
from pairfarm.protocol import FailReport, PostprocessLease, PostprocessReport

log = logging.getLogger(__name__)
KIND = "postprocess"
T = TypeVar("T")
RETRIES = 5


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
    return write_outputs(shard, batch_id, scores, decisions, out_dir=out.out_dir,
                         tfds_dir=out.tfds_dir)


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

    def _fail(self, lease: PostprocessLease, reason: str, *, release: bool) -> None:
        body = FailReport(lease_token=lease.lease_token, reason=reason[:2000], release=release)
        try:
            self.client.fail(KIND, lease.batch_id, body)
        except (LeaseLost, Unavailable) as exc:
            log.warning("batch %d: could not report the failure: %s", lease.batch_id, exc)


def node_name() -> str:
    return f"{socket.gethostname()}-gpu"
