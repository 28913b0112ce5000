"""Checks of completion reports against their batch, and the digest that makes a repeated
report recognisable (pure logic, no database).

Error handling: every check raises ``InvalidReport`` (HTTP 422) saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from coordinator.errors import InvalidReport
from pairfarm.outcomes import ALL_OUTCOMES, TRANSIENT, Outcome
from pairfarm.protocol import DownloadReport, PostprocessReport


def digest(report: DownloadReport | PostprocessReport) -> str:
    """sha256 of the report's canonical JSON: equal reports have equal digests."""
    body = json.dumps(report.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def check_download(report: DownloadReport, batch_size: int) -> None:
    unknown = sorted(set(report.outcomes) - set(ALL_OUTCOMES))
    if unknown:
        raise InvalidReport(f"unknown outcome classes {unknown}; known: {list(ALL_OUTCOMES)}")
    _check_counts(report.outcomes)
    total = sum(report.outcomes.values())
    if total != batch_size:
        raise InvalidReport(
            f"outcome counts sum to {total}, the batch holds {batch_size} candidates: "
            "every candidate needs exactly one outcome")
    _check_retry(report)


def _check_retry(report: DownloadReport) -> None:
    """The ids to retry: transient classes only, each id once, no more in a class than
    the class counts."""
    transient = {o.value for o in TRANSIENT}
    wrong = sorted(set(report.retry) - transient)
    if wrong:
        raise InvalidReport(f"retry names classes that are not transient: {wrong}; "
                            f"transient: {sorted(transient)}")
    over = sorted(k for k, ids in report.retry.items() if len(ids) > report.outcomes.get(k, 0))
    if over:
        raise InvalidReport(f"retry lists more candidates than the outcome counts for {over}")
    ids, _ = retry_columns(report)
    if len(set(ids)) != len(ids):
        raise InvalidReport("retry lists a candidate more than once")


def retry_columns(report: DownloadReport) -> tuple[list[int], list[str]]:
    """The report's retries as two parallel lists: candidate ids, their outcome classes."""
    ids = [i for k in sorted(report.retry) for i in report.retry[k]]
    classes = [k for k in sorted(report.retry) for _ in report.retry[k]]
    return ids, classes


def check_retries(*, asked: int, members: int, sent_back: int, url_retries: int) -> None:
    """What ``queue_retries`` did with the ``asked`` retries: all must be members of the
    batch and all sent back (none past its last attempt)."""
    if members != asked:
        raise InvalidReport(f"retry lists {asked - members} candidates that are not in "
                            "this batch")
    if sent_back != asked:
        raise InvalidReport(
            f"retry lists {asked - sent_back} candidates at their last attempt (this "
            f"coordinator retries a URL {url_retries} times): their outcome is final")


def final_outcomes(outcomes: Mapping[str, int], sent_back: Mapping[str, int]) -> dict[str, int]:
    """The batch's outcome counts less the candidates sent back for a retry (classes
    left at 0 are dropped)."""
    left = {k: v - sent_back.get(k, 0) for k, v in outcomes.items()}
    return {k: v for k, v in left.items() if v > 0 or k not in sent_back}


def check_postprocess(report: PostprocessReport, outcomes: Mapping[str, Any] | None) -> None:
    ok = int((outcomes or {}).get(Outcome.OK.value, 0))
    if report.kept + report.dropped > ok:
        raise InvalidReport(
            f"kept + dropped = {report.kept + report.dropped}, the shard holds {ok} samples")
    _check_counts(report.drop_reasons)
    if report.drop_reasons and sum(report.drop_reasons.values()) > report.dropped:
        raise InvalidReport("drop reasons count more samples than were dropped")
    edges, counts = report.similarity_edges, report.similarity_counts
    if (edges or counts) and len(edges) != len(counts) + 1:
        raise InvalidReport(
            f"a histogram needs len(edges) == len(counts) + 1, got {len(edges)}, {len(counts)}")
    if any(c < 0 for c in counts) or sorted(edges) != list(edges):
        raise InvalidReport("histogram counts must be >= 0 and edges ascending")


def _check_counts(counts: Mapping[str, int]) -> None:
    negative = sorted(k for k, v in counts.items() if v < 0)
    if negative:
        raise InvalidReport(f"negative counts for {negative}")
