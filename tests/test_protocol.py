"""The wire form of a download lease: candidates travel as columns."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from pairfarm.protocol import Candidate, DownloadLease, PostprocessReport

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


GOOD_POSTPROCESS = {"lease_token": "t", "kept": 3, "dropped": 1, "drop_reasons": {"nsfw": 1},
                    "similarity_edges": [-1.0, 0.0, 1.0], "similarity_counts": [1, 3],
                    "outputs": {"tar": "s3://b/00000001.tar"}, "duration_s": 2}


@pytest.mark.parametrize(("field", "value"), [
    ("kept", 2**31), ("kept", 3.0), ("dropped", True), ("drop_reasons", {"nsfw": "1"}),
    ("drop_reasons", {"ns\x00fw": 1}), ("similarity_edges", [-1.0, float("nan"), 1.0]),
    ("similarity_edges", [float("-inf"), 0.0, 1.0]), ("similarity_counts", [1, 2**63]),
    ("outputs", {"tar": "s3://b/\x00.tar"}), ("duration_s", float("inf")),
])
def test_postprocess_reports_are_strict(field: str, value: object) -> None:
    """What the database cannot hold (NaN in jsonb, a NUL, a number past its column) or
    what is no count at all is refused by the model, before anything reaches it."""
    assert PostprocessReport.model_validate(GOOD_POSTPROCESS).duration_s == 2.0
    with pytest.raises(ValidationError) as info:
        PostprocessReport.model_validate(json.loads(json.dumps({**GOOD_POSTPROCESS,
                                                                field: value})))
    assert info.value.errors()[0]["loc"][0] == field
