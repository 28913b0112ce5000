"""Pure logic: settings validation and the adaptive sample rate."""

from __future__ import annotations

import pytest

from coordinator.errors import SettingsError
from coordinator.sampling import SampleRate
from coordinator.settings import make_lease_settings, make_settings, normalize_url


def test_database_urls_are_normalised_to_psycopg() -> None:
    assert normalize_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("postgresql://h/db") == "postgresql+psycopg://h/db"
    with pytest.raises(SettingsError, match="not mysql:"):
        normalize_url("mysql://h/db")


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"lease_ttl_s": 0.5},
                                 {"max_attempts": 0}, {"max_sample_rows": 10}])
def test_lease_settings_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(SettingsError):
        make_lease_settings(**bad)  # type: ignore[arg-type]


def test_settings_defaults_and_checks() -> None:
    settings = make_settings()
    assert settings.lease.batch_size == 10_000
    assert settings.lease.heartbeat_interval_s == settings.lease.lease_ttl_s / 3
    with pytest.raises(SettingsError, match="port"):
        make_settings(port=70_000)


def test_rate_follows_the_unbatched_fraction() -> None:
    rate = SampleRate(oversample=1.5, max_rows=2_000_000)
    assert rate.percent(10_000, 10_000_000) == pytest.approx(0.15)
    rate.observe(0.15, 10_000_000, 150)  # 1 % of the rows still unbatched
    assert rate.fraction == pytest.approx(0.01)
    assert rate.percent(10_000, 10_000_000) == pytest.approx(15.0)


def test_rate_gives_way_to_the_index_when_a_sample_would_cost_too_much() -> None:
    rate = SampleRate(oversample=1.5, max_rows=200_000)
    rate.observe(1.0, 10_000_000, 0)  # an empty sample: the estimate drops tenfold
    assert rate.fraction == pytest.approx(0.1)
    rate.observe(15.0, 10_000_000, 1_000)
    assert rate.percent(10_000, 10_000_000) is None, "over max_rows: use the index"
    before = rate.fraction
    rate.used_index()
    assert rate.fraction > before, "the estimate recovers so that sampling is retried"
    assert rate.percent(10_000, 0) is None, "an empty or unanalysed table uses the index"
    assert SampleRate().percent(10_000, 5_000) == 100.0, "a small table is sampled whole"


def test_rate_counts_the_cost_of_empty_pages() -> None:
    """A drained table whose statistics are fresh: 100k rows left on pages that held 10M.
    Sampling 15 % of them would read 1.5M rows' worth of pages."""
    rate = SampleRate(oversample=1.5, max_rows=200_000)
    assert rate.percent(10_000, 100_000) == pytest.approx(15.0)
    assert rate.percent(10_000, 100_000, capacity=10_000_000) is None


def test_sample_spreads_over_pages_whatever_the_rows_width() -> None:
    """Narrow rows (43 a page): enough pages that a batch takes at most page_share chunks
    from each; wide rows (3 a page): the margin alone, no page read beyond it."""
    rate = SampleRate(oversample=1.25, max_rows=10_000_000, page_share=11)
    narrow = rate.percent(625, 1_250_000, page_rows=43)
    wide = rate.percent(625, 1_250_000, page_rows=3)
    assert narrow is not None and wide is not None
    assert narrow / 100 * 1_250_000 == pytest.approx(625 / 11 * 43)  # ~57 pages of 43
    assert wide / 100 * 1_250_000 == pytest.approx(1.25 * 625)  # ~260 pages of 3
    assert SampleRate(oversample=1.25).percent(625, 1_250_000, page_rows=43) == \
        pytest.approx(100 * 1.25 * 625 / 1_250_000), "page_share 0: the margin alone"
