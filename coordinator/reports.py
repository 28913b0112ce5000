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
from pairfarm.outcomes import ALL_OUTCOMES, Outcome
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
