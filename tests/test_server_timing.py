"""``coordinator.timing``: the Server-Timing header it writes and reads back."""

from __future__ import annotations

import pytest

from coordinator.timing import app_seconds, header_value


def test_the_written_value_reads_back() -> None:
    assert app_seconds(header_value(0.01234).decode()) == pytest.approx(0.01234, abs=1e-5)


@pytest.mark.parametrize(("value", "seconds"), [
    ("app;dur=12.5", 0.0125),
    ("db;dur=3, app;desc=\"handler\";dur=7", 0.007),
    ("cache, app ; dur=0", 0.0),
    (None, None),
    ("", None),
    ("db;dur=3", None),
    ("app", None),
    ("app;dur=abc", None),
])
def test_app_duration_among_other_metrics(value: str | None, seconds: float | None) -> None:
    got = app_seconds(value)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)
