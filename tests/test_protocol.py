"""The wire form of a download lease: candidates travel as columns."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from pairfarm.protocol import Candidate, DownloadLease

ROWS = [Candidate(id=7, url="http://a.test/1.jpg", caption="first", extra={"w": 640}),
        Candidate(id=9, url="http://b.test/2.jpg", caption="second", language="de")]


def _lease() -> DownloadLease:
    return DownloadLease(batch_id=1, lease_token="t", attempt=1,
                         lease_expires_at=datetime(2026, 12, 1, tzinfo=UTC), candidates=ROWS)


def test_candidates_cross_the_wire_as_columns_and_come_back_as_rows() -> None:
    wire = json.loads(_lease().model_dump_json())
    assert wire["candidates"] == {
        "id": [7, 9], "url": ["http://a.test/1.jpg", "http://b.test/2.jpg"],
        "caption": ["first", "second"], "language": [None, "de"],
        "extra": [{"w": 640}, {}]}
    back = DownloadLease.model_validate_json(json.dumps(wire))
    assert back.candidates == ROWS
    assert isinstance(back.candidates[0], Candidate)


def test_columns_of_different_lengths_are_rejected() -> None:
    wire = json.loads(_lease().model_dump_json())
    wire["candidates"]["url"].pop()
    with pytest.raises(ValidationError, match="differ in length"):
        DownloadLease.model_validate_json(json.dumps(wire))
    wire = json.loads(_lease().model_dump_json())
    wire["candidates"]["id"][0] = "seven"
    with pytest.raises(ValidationError):
        DownloadLease.model_validate_json(json.dumps(wire))
