"""The knn package on what post-processing really writes: two shards scored by the tiny
CLIP (``gpu_postprocess.node.process_shard``), then indexed and exported."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from gpu_postprocess.models import ModelSpec
from gpu_postprocess.node import process_shard
from gpu_postprocess.pipeline import build_scorer
from gpu_postprocess.settings import OutputSettings, ScoringSettings, parse_thresholds
from gpu_postprocess.shardio import open_local_shard
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings
from knn.build import BuildSettings, build_index
from knn.errors import SourceError
from knn.index import open_index
from knn.sisap import SisapSettings, export_sisap
from tests.gpu_shards import Row, write_shard
from tests.gpu_tiny import TINY_MODEL, evaluation_rows

BATCHES = (3, 4, 5)


@pytest.fixture(scope="module")
def farm_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows, _ = evaluation_rows()
    shards = tmp_path_factory.mktemp("shards")
    out = tmp_path_factory.mktemp("out")
    scorer = build_scorer(ScoringSettings(
        model=ModelSpec(TINY_MODEL), device="cpu", batch_size=16, workers=0,
        thresholds=parse_thresholds(["*=-1"]),  # keep every decoded sample
        watermark=WatermarkSettings(kind=WatermarkKind.OFF)))
    for batch in BATCHES:
        write_shard(shards, batch, [*rows[batch:], Row("no image", None)])
        shard = open_local_shard(shards / f"{batch:08d}.tar", shards / f"{batch:08d}.parquet")
        process_shard(scorer, shard, batch, OutputSettings(out_dir=out))
    return out


def _written(out: Path) -> tuple[np.ndarray, list[str]]:
    emb = out / "embeddings"
    vectors = np.concatenate([np.load(emb / "img_emb" / f"img_emb_{b:08d}.npy")
                              for b in BATCHES])
    urls = [u for b in BATCHES
            for u in pq.read_table(emb / "metadata" / f"metadata_{b:08d}.parquet")
            .column("url").to_pylist()]
    return vectors, urls


def test_the_index_reads_post_processing_output(farm_out: Path, tmp_path: Path) -> None:
    vectors, urls = _written(farm_out)
    with pytest.raises(SourceError, match="no rows left once NSFW rows are removed"):
        # the tiny 32-d model has no NSFW detector: every row is UNTAGGED
        build_index(farm_out, tmp_path / "idx", BuildSettings(budget=2**30))
    report = build_index(farm_out, tmp_path / "idx",
                         BuildSettings(budget=2**30, keep_untagged=True))
    assert report.info.ntotal == len(vectors) == len(urls)
    assert [s.stem for s in report.info.shards] == [f"{b:08d}" for b in BATCHES]
    index = open_index(tmp_path / "idx")
    sims, ids = index.search(vectors[[0, -1]], 1)
    np.testing.assert_allclose(sims[:, 0], 1, atol=2e-3)
    np.testing.assert_array_equal(vectors[ids[:, 0]], vectors[[0, -1]])  # itself or a twin
    rows = index.rows(ids[:, 0])
    assert [r["url"] for r in rows if r] == [urls[i] for i in ids[:, 0]]


def test_the_sisap_export_reads_post_processing_output(farm_out: Path, tmp_path: Path) -> None:
    vectors, _ = _written(farm_out)
    first = len(np.load(farm_out / "embeddings" / "img_emb" / "img_emb_00000003.npy"))
    result = export_sisap(farm_out, tmp_path / "sisap", SisapSettings(
        queries=5, neighbours=4, pca_dims=(8, 16), keep_untagged=True))
    assert (result.n, result.dim) == (len(vectors) - first, 32)
    with h5py.File(tmp_path / "sisap" / result.files["emb"]) as f:
        np.testing.assert_array_equal(np.array(f["emb"]), vectors[first:])
