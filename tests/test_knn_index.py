"""pairfarm index: choosing under a memory budget, building, growing, recall, loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knn.build import BuildSettings, build_index
from knn.choose import Choice, choose_index, parse_memory, rebuild_reason
from knn.errors import IndexBuildError, IndexLoadError, SourceError
from knn.exact import exact_knn
from knn.index import open_index
from tests.knn_data import clustered, write_embeddings

D = 32


def test_parse_memory() -> None:
    assert parse_memory("512M") == 512 * 2**20
    assert parse_memory("1.5G") == 3 * 2**29
    assert parse_memory("1000") == 1000
    with pytest.raises(IndexBuildError, match="not a memory size"):
        parse_memory("lots")


@pytest.mark.parametrize(("n", "budget", "key"), [
    (500, 10**9, "Flat"),
    (1_000_000, 16 * 2**30, "HNSW32_SQfp16"),  # at most 32 links
    (1_000_000, 1_000_000 * (8 + 2 * 512 + 8 * 20) + 7, "HNSW20_SQfp16"),
    (100_000, 100_000 * (D * 2 + 8) + 1024 * D * 4, "IVF1024,SQfp16"),
    (100_000, 100_000 * (D + 8) + 1024 * D * 4, "IVF1024,SQ8"),
    (2_000_000, 2_000_000 * 24, "OPQ8_40,IVF16384_HNSW32,PQ8x8"),
])
def test_choose_index_under_the_budget(n: int, budget: int, key: str) -> None:
    d = 512 if n == 1_000_000 else D
    choice = choose_index(n, d, budget)
    assert choice.key == key
    assert choice.size_bytes(n, d) <= budget


def test_a_budget_too_small_for_any_index_is_refused() -> None:
    with pytest.raises(IndexBuildError, match="too small"):
        choose_index(100_000, D, 100_000 * 4)


def test_rebuild_reasons() -> None:
    ivf = Choice("IVFfp16", nlist=64)
    assert rebuild_reason(ivf, 10_000, 80_000, D, 10**9) is None
    assert "trained for 10,000" in str(rebuild_reason(ivf, 10_000, 80_001, D, 10**9))
    assert "Flat is for fewer" in str(rebuild_reason(Choice("Flat"), 900, 1000, D, 10**9))
    assert "over the" in str(rebuild_reason(Choice("HNSW", m=32), 1, 10_000, D, 10**6))


def test_exact_knn_matches_a_full_sort() -> None:
    x, q = clustered(700, D, seed=3), clustered(20, D, seed=4)
    got = exact_knn(q, [x[:250], x[250:600], x[600:]], 15)
    sims = q @ x.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :15]
    np.testing.assert_array_equal(got.ids, want)
    np.testing.assert_allclose(got.similarities, np.take_along_axis(sims, want, 1), rtol=1e-5)


@pytest.fixture
def farm(tmp_path: Path) -> tuple[Path, np.ndarray]:
    x = clustered(4000, D, seed=1)
    write_embeddings(tmp_path / "out", x[:2000], 500, nsfw_every=7)
    return tmp_path / "out", x


def _kept(x: np.ndarray, nsfw_every: int = 7) -> np.ndarray:
    return x[np.arange(len(x)) % nsfw_every != nsfw_every - 1]


def test_build_reaches_the_recall_target_and_maps_ids_to_rows(
        farm: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    src, x = farm
    report = build_index(src, tmp_path / "idx", BuildSettings(budget=2**30, eval_queries=200))
    info = report.info
    kept = _kept(x[:2000])
    assert (info.key, info.ntotal, report.added) == ("HNSW32_SQfp16", len(kept), len(kept))
    assert sum(s.dropped for s in info.shards) == 2000 - len(kept)  # NSFW rows removed
    assert info.recall_at_10 is not None and info.recall_at_10 >= 0.95
    assert info.param == "efSearch" and info.value is not None and info.value >= 11
    index = open_index(tmp_path / "idx")
    assert index.ntotal == len(kept)  # the held-out evaluation rows were added after tuning
    found = index.search(kept, 1)[1][:, 0]
    assert (found == np.arange(len(kept))).mean() > 0.99  # every row under its own id
    sims, ids = index.search(kept[[5, 900]].astype(np.float16), 3)
    assert ids[:, 0].tolist() == [5, 900]
    np.testing.assert_allclose(sims[:, 0], 1, atol=2e-3)
    rows = index.rows(ids[:, 0])
    original = np.flatnonzero(np.arange(2000) % 7 != 6)[[5, 900]]  # rows 5 and 1050
    assert [r["url"] for r in rows if r] == [
        f"http://127.0.0.1/{r // 500 + 1:08d}/{r % 500}.jpg" for r in original]
    assert {r["NSFW"] for r in index.table().to_pylist()} == {"UNLIKELY"}


def test_an_ivf_index_grows_without_retraining(farm: tuple[Path, np.ndarray],
                                               tmp_path: Path) -> None:
    src, x = farm
    budget = 200_000  # 1,715 rows: IVF43,SQfp16 takes 129k bytes, HNSW8 would take 233k
    first = build_index(src, tmp_path / "idx", BuildSettings(budget=budget, eval_queries=100))
    assert first.info.kind == "IVFfp16" and first.rebuilt == "new index"
    old_file = tmp_path / "idx" / first.info.index_file
    write_embeddings(src, x[2000:3000], 500, nsfw_every=7, first_batch=5)
    grown = build_index(src, tmp_path / "idx", BuildSettings(budget=2 * budget,
                                                              eval_queries=100))
    kept = np.concatenate([_kept(x[:2000]), _kept(x[2000:3000])])
    assert grown.rebuilt is None and grown.info.key == first.info.key
    assert grown.info.trained_n == first.info.trained_n
    assert (grown.added, grown.info.ntotal) == (len(kept) - first.info.ntotal, len(kept))
    assert not old_file.exists()
    assert grown.info.recall_at_10 is not None and grown.info.recall_at_10 >= 0.95
    index = open_index(tmp_path / "idx")
    _, ids = index.search(kept[-1:], 1)
    row = index.rows(ids[0])[0]
    assert row is not None and row["shard"] == "00000006" and ids[0, 0] == len(kept) - 1
    again = build_index(src, tmp_path / "idx", BuildSettings(budget=2 * budget))
    assert again.added == 0 and again.info == grown.info
    write_embeddings(src, x[3000:3005], 5, first_batch=9)  # too few rows to hold any out
    tiny = build_index(src, tmp_path / "idx", BuildSettings(budget=2 * budget))
    assert tiny.added == 5 and tiny.info.ntotal == grown.info.ntotal + 5
    assert (tiny.info.value, tiny.info.recall_at_10) == (grown.info.value,
                                                         grown.info.recall_at_10)


def test_a_flat_index_is_rebuilt_once_it_grows_past_exact_size(
        farm: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    _, x = farm
    small = tmp_path / "small"
    write_embeddings(small, x[:600], 600)
    first = build_index(small, tmp_path / "idx", BuildSettings(budget=2**30))
    assert first.info.kind == "Flat" and first.info.recall_at_10 == 1.0
    write_embeddings(small, x[600:1200], 600, first_batch=2)
    second = build_index(small, tmp_path / "idx", BuildSettings(budget=2**30))
    assert second.info.kind == "HNSW" and "Flat is for fewer" in str(second.rebuilt)
    assert second.info.ntotal == 1200


def test_clear_errors(tmp_path: Path, farm: tuple[Path, np.ndarray]) -> None:
    src, _ = farm
    with pytest.raises(SourceError, match="no img_emb"):
        build_index(tmp_path / "nowhere", tmp_path / "idx", BuildSettings(budget=2**30))
    with pytest.raises(IndexLoadError, match=r"no index\.json"):
        open_index(tmp_path)
    (src / "embeddings" / "metadata" / "metadata_00000002.parquet").unlink()
    with pytest.raises(SourceError, match="no metadata file"):
        build_index(src, tmp_path / "idx", BuildSettings(budget=2**30))
    with pytest.raises(IndexBuildError, match="recall target"):
        BuildSettings(budget=1, recall_target=1.5)


def test_queries_of_the_wrong_width_are_refused(farm: tuple[Path, np.ndarray],
                                                tmp_path: Path) -> None:
    src, _ = farm
    build_index(src, tmp_path / "idx", BuildSettings(budget=2**30, eval_queries=20))
    with pytest.raises(ValueError, match="width 16"):
        open_index(tmp_path / "idx").search(np.ones((1, 16)), 1)


def test_shards_still_being_post_processed_wait_for_the_next_run(
        farm: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    src, _ = farm
    for stem in ("00000001", "00000002", "00000003"):  # 00000004 has no done marker yet
        (src / f"{stem}_postprocess.json").write_text("{}")
    first = build_index(src, tmp_path / "idx", BuildSettings(budget=2**30, eval_queries=50))
    assert [s.stem for s in first.info.shards] == ["00000001", "00000002", "00000003"]
    (src / "00000004_postprocess.json").write_text("{}")
    second = build_index(src, tmp_path / "idx", BuildSettings(budget=2**30, eval_queries=50))
    assert second.rebuilt is None and second.info.shards[-1].stem == "00000004"
