"""The shard writer: row limits, temporary names, the on_shard hook."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from extract.shards import SCHEMA, ShardWriter, candidate_table


def table(start: int, n: int):  # type: ignore[no-untyped-def]
    return candidate_table(
        url=[f"https://e.com/{i}.jpg" for i in range(start, start + n)],
        caption=[f"caption {i}" for i in range(start, start + n)],
        page_url=["https://e.com/"] * n, language=["en"] * n, language_score=[0.9] * n,
        source="a.wat.gz",
    )


def test_rows_are_split_into_shards_in_order(tmp_path: Path) -> None:
    published: list[tuple[str, list[str]]] = []

    def on_shard(path: Path) -> None:
        assert not list(tmp_path.glob("*.tmp"))  # renamed before the hook runs
        published.append((path.name, pq.read_table(path)["url"].to_pylist()))

    with ShardWriter(tmp_path, "run1", rows_per_shard=4, on_shard=on_shard) as writer:
        writer.write(table(0, 3))
        writer.write(table(3, 6))
        writer.write(table(9, 0))
    assert [name for name, _ in published] == [
        "run1-00000.parquet", "run1-00001.parquet", "run1-00002.parquet",
    ]
    assert [len(urls) for _, urls in published] == [4, 4, 1]
    assert [u for _, urls in published for u in urls] == [
        f"https://e.com/{i}.jpg" for i in range(9)
    ]
    assert pq.read_schema(tmp_path / "run1-00000.parquet").names == SCHEMA.names


def test_no_rows_no_shard(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "run2", rows_per_shard=4) as writer:
        writer.write(table(0, 0))
    assert writer.shards == []
    assert list(tmp_path.iterdir()) == []


def test_leaving_on_error_publishes_without_the_hook(tmp_path: Path) -> None:
    calls: list[Path] = []
    with pytest.raises(KeyboardInterrupt), ShardWriter(
            tmp_path, "run3", rows_per_shard=10, on_shard=calls.append) as writer:
        writer.write(table(0, 2))
        raise KeyboardInterrupt
    assert calls == []
    assert pq.read_table(tmp_path / "run3-00000.parquet").num_rows == 2
