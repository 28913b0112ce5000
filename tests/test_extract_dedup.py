"""Dedup keys, the run's exact set and the persistent Bloom filter."""

from __future__ import annotations

from pathlib import Path

import pytest

from extract.dedup import BloomParams, BloomStore, KeyMode, RunDedup, dedup_key, estimated_fpr
from extract.errors import BloomFileError

PARAMS = BloomParams(capacity=20_000, false_positive_rate=0.01, key_mode=KeyMode.URL_ALT)


def test_dedup_key_modes() -> None:
    a = dedup_key("https://e.com/a.jpg", "A cat", KeyMode.URL_ALT)
    assert a == dedup_key("https://e.com/a.jpg", "A cat", KeyMode.URL_ALT)
    assert a != dedup_key("https://e.com/a.jpg", "A dog", KeyMode.URL_ALT)
    assert dedup_key("https://e.com/a.jpg", "A cat", KeyMode.URL) == dedup_key(
        "https://e.com/a.jpg", "A dog", KeyMode.URL)
    assert -(2**127) <= a < 2**127


def test_dedup_key_separates_url_and_caption() -> None:
    assert dedup_key("https://e.com/ab", "c", KeyMode.URL_ALT) != dedup_key(
        "https://e.com/a", "bc", KeyMode.URL_ALT)


def test_run_dedup_is_exact() -> None:
    dedup = RunDedup()
    assert [dedup.first_time(k) for k in (1, 2, 1, 3, 2)] == [True, True, False, True, False]
    assert len(dedup) == 3


def keys(prefix: str, n: int) -> list[int]:
    return [dedup_key(f"https://{prefix}.example.com/{i}.jpg", "A caption", KeyMode.URL_ALT)
            for i in range(n)]


def test_bloom_filter_persists_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "seen.bloom"
    first = BloomStore.open(path, PARAMS)
    assert not first.loaded
    assert not any(first.seen_before(k) for k in keys("a", 1000))
    first.save()

    second = BloomStore.open(path, PARAMS)
    assert second.loaded
    assert all(second.seen_before(k) for k in keys("a", 1000))
    assert second.added == 0
    assert sum(second.seen_before(k) for k in keys("b", 1000)) <= 30  # only false positives


def test_false_positive_rate_is_near_the_configured_one_at_capacity(tmp_path: Path) -> None:
    store = BloomStore.open(tmp_path / "f.bloom", PARAMS)
    for k in keys("in", PARAMS.capacity):
        store.seen_before(k)
    probes = keys("out", 20_000)
    false_positives = sum(k in store._bloom for k in probes)
    measured = false_positives / len(probes)
    report = store.report()
    assert 0.002 < measured < 0.02
    assert report["estimated_false_positive_rate"] == pytest.approx(0.01, rel=0.3)
    assert report["approx_items"] == pytest.approx(PARAMS.capacity, rel=0.05)
    for k in keys("more", PARAMS.capacity):
        store.seen_before(k)
    assert store.report()["over_capacity"] is True
    assert store.report()["estimated_false_positive_rate"] > 0.1


def test_an_existing_filter_keeps_its_own_size(tmp_path: Path) -> None:
    path = tmp_path / "s.bloom"
    BloomStore.open(path, PARAMS).save()
    reopened = BloomStore.open(path, BloomParams(10**6, 0.001, KeyMode.URL_ALT))
    assert reopened.params.capacity == PARAMS.capacity
    assert reopened.report()["configured_false_positive_rate"] == 0.01


def test_a_filter_of_the_other_key_mode_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.bloom"
    BloomStore.open(path, PARAMS).save()
    with pytest.raises(BloomFileError, match="dedup-key"):
        BloomStore.open(path, BloomParams(20_000, 0.01, KeyMode.URL))


def test_a_damaged_filter_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.bloom"
    BloomStore.open(path, PARAMS).save()
    path.write_bytes(b"not a bloom filter")
    with pytest.raises(BloomFileError, match="damaged"):
        BloomStore.open(path, PARAMS)
    (tmp_path / "d.bloom.json").write_text("{")
    with pytest.raises(BloomFileError, match="parameters"):
        BloomStore.open(path, PARAMS)


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = BloomStore.open(tmp_path / "t.bloom", PARAMS)
    store.seen_before(42)
    store.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bloom", "t.bloom.json"]


def test_estimated_fpr_grows_with_fill() -> None:
    bits = 95_851  # 10k items at 1 %
    assert estimated_fpr(bits, 10_000, 0) == 0.0
    assert estimated_fpr(bits, 10_000, 1_000) < 1e-6
    assert estimated_fpr(bits, 10_000, 10_000) == pytest.approx(0.01, rel=0.1)
    assert estimated_fpr(bits, 10_000, 40_000) > 0.3
