"""End to end on the committed tiny CLIP: keep matched pairs, drop mismatched ones, write
every output; thresholds across the gap; batch-size invariance; language routing."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_postprocess.errors import ShardError
from gpu_postprocess.models import ModelSpec
from gpu_postprocess.node import process_shard
from gpu_postprocess.pipeline import Scorer, build_scorer, decide, score_shard
from gpu_postprocess.settings import OutputSettings, ScoringSettings, parse_thresholds
from gpu_postprocess.shardio import open_local_shard, open_shard
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings
from pairfarm.shardformat import key_of
from tests.conftest import run_cli
from tests.gpu_shards import Row, write_shard
from tests.gpu_tiny import TINY_DIR, TINY_MODEL, evaluation_rows, gap

OFF = WatermarkSettings(kind=WatermarkKind.OFF)


def scorer(threshold: float, *, batch_size: int = 16, workers: int = 0,
           text_models: dict[str, ModelSpec] | None = None) -> Scorer:
    settings = ScoringSettings(
        model=ModelSpec(TINY_MODEL), device="cpu", batch_size=batch_size, workers=workers,
        thresholds=parse_thresholds([f"en={threshold}", f"*={threshold}"]),
        text_models=text_models or {}, watermark=OFF)
    return build_scorer(settings)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows, _ = evaluation_rows()
    rows += [Row("a photo of nothing", None), Row("a broken jpeg", b"\xff\xd8\xff\xe0broken")]
    folder = tmp_path_factory.mktemp("shard")
    write_shard(folder, 3, rows)
    return folder


def test_cli_keeps_matched_drops_mismatched_and_writes_outputs(shard_dir: Path,
                                                                tmp_path: Path) -> None:
    _, match = evaluation_rows()
    t = gap()["threshold"]
    out = tmp_path / "out"
    proc = run_cli("postprocess-shard", str(shard_dir / "00000003.tar"),
                   str(shard_dir / "00000003.parquet"), "--model", TINY_MODEL,
                   "--device", "cpu", "--workers", "2", "--batch-size", "8",
                   "--threshold", f"en={t}", "--threshold", f"*={t}", "--watermark", "off",
                   "--out", str(out), timeout=300)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kept"] == sum(match)
    # counts over the shard's samples; the failed download stays in the parquet only
    assert summary["dropped"] == len(match) - sum(match) + 1
    assert summary["drop_reasons"] == {"low_similarity": len(match) - sum(match),
                                       "decode_error": 1}
    kept_keys = [key_of(3, i) for i, m in enumerate(match) if m]
    _check_filtered_tar(out / "00000003.tar", kept_keys)
    _check_metadata(out / "00000003.parquet", match)
    _check_embeddings(out / "embeddings", "00000003", kept_keys)
    done = json.loads((out / "00000003_postprocess.json").read_text())
    assert sum(done["similarity_counts"]) == len(match)  # decoded samples only
    stats = json.loads((out / "00000003_stats.json").read_text())  # img2dataset's keys
    assert stats["count"] == len(match) + 2 and stats["successes"] == sum(match)
    assert stats["failed_to_download"] == 1 and stats["failed_to_resize"] == 0
    assert stats["status_dict"] == {"success": sum(match), "http_4xx": 1, "decode_error": 1,
                                    "low_similarity": len(match) - sum(match)}


def _check_filtered_tar(path: Path, kept_keys: list[str]) -> None:
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names == [f"{k}.{e}" for k in kept_keys for e in ("jpg", "txt", "json")]
        meta = json.loads(tar.extractfile(f"{kept_keys[0]}.json").read())  # type: ignore[union-attr]
    assert meta["similarity"] >= gap()["threshold"]
    assert meta["punsafe"] is None and meta["nsfw"] == "UNTAGGED"  # no NSFW model for 32-d
    assert meta["pwatermark"] is None  # watermark off: empty, not invented
    assert meta["caption"]


def _check_metadata(path: Path, match: list[bool]) -> None:
    table = pq.read_table(path).to_pylist()
    assert len(table) == len(match) + 2
    for row, m in zip(table, match, strict=False):
        assert row["keep"] is m
        assert row["drop_reason"] == (None if m else "low_similarity")
        assert row["similarity"] is not None
    assert table[-2]["drop_reason"] == "not_downloaded" and table[-2]["similarity"] is None
    assert table[-1]["drop_reason"] == "decode_error" and table[-1]["keep"] is False


def _check_embeddings(folder: Path, stem: str, kept_keys: list[str]) -> None:
    img = np.load(folder / "img_emb" / f"img_emb_{stem}.npy")
    txt = np.load(folder / "text_emb" / f"text_emb_{stem}.npy")
    meta = pq.read_table(folder / "metadata" / f"metadata_{stem}.parquet").to_pylist()
    assert img.dtype == txt.dtype == np.float16
    assert img.shape == txt.shape == (len(kept_keys), 32)
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    assert [m["key"] for m in meta] == kept_keys
    sims = np.sum(img.astype(np.float32) * txt.astype(np.float32), axis=1)
    np.testing.assert_allclose(sims, [m["similarity"] for m in meta], atol=5e-3)


def test_moving_the_threshold_across_the_gap_flips_decisions(shard_dir: Path) -> None:
    g = gap()
    _, match = evaluation_rows()
    is_match = np.array([*match, False, False])
    shard = open_local_shard(shard_dir / "00000003.tar", shard_dir / "00000003.parquet")
    s = scorer(g["threshold"])
    scores = score_shard(s, shard)
    in_gap = decide(shard, scores, s.thresholds)
    assert (in_gap.keep == is_match).all()
    # The edges of the gap as scored on this CPU: float32 sums differ in the last bits
    # between CPUs and thread counts, so the recorded edges only hold to ~1e-6.
    matched_min = float(np.nanmin(in_gap.similarity[is_match]))
    mismatched_max = float(np.nanmax(in_gap.similarity[~is_match]))
    assert matched_min == pytest.approx(g["matched_min"], abs=1e-4)
    assert mismatched_max == pytest.approx(g["mismatched_max"], abs=1e-4)
    low = decide(shard, scores, parse_thresholds([f"en={mismatched_max!r}"]))
    assert low.keep[~is_match].sum() >= 1 and low.keep[is_match].all()
    above = np.nextafter(np.float32(matched_min), np.float32(1))
    high = decide(shard, scores, parse_thresholds([f"en={float(above)!r}"]))
    assert (~high.keep[is_match]).sum() >= 1 and not high.keep[~is_match].any()


def test_scores_do_not_depend_on_batch_size_or_workers(shard_dir: Path) -> None:
    shard = open_local_shard(shard_dir / "00000003.tar", shard_dir / "00000003.parquet")
    t = gap()["threshold"]
    runs = [score_shard(scorer(t, batch_size=b, workers=w), shard)
            for b, w in ((1, 0), (7, 2), (64, 1))]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.decoded, runs[0].decoded)
        np.testing.assert_allclose(other.similarity, runs[0].similarity, atol=1e-5,
                                   equal_nan=True)
        np.testing.assert_allclose(other.img_emb, runs[0].img_emb, atol=1e-5)


def _perturbed_copy(dest: Path) -> Path:
    """The tiny model with its text projection scaled per column: another embedding space."""
    shutil.copytree(TINY_DIR, dest)
    state = load_file(str(dest / "open_clip_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    state["text_projection"] = (state["text_projection"].float() *
                                torch.rand(state["text_projection"].shape[1], generator=gen)
                                ).half()
    save_file(state, str(dest / "open_clip_model.safetensors"))
    return dest


def test_languages_are_scored_by_their_routed_model(tmp_path: Path) -> None:
    rows, _ = evaluation_rows(languages=("en", "de", "fr"))
    write_shard(tmp_path / "in", 5, rows)
    shard = open_local_shard(tmp_path / "in" / "00000005.tar", tmp_path / "in" / "00000005.parquet")
    other = ModelSpec(f"local-dir:{_perturbed_copy(tmp_path / 'other')}")
    t = gap()["threshold"]
    plain = score_shard(scorer(t), shard)
    routed = score_shard(scorer(t, text_models={"*": other}), shard)
    only_other = score_shard(build_scorer(ScoringSettings(model=other, device="cpu",
                                                          watermark=OFF, workers=0)), shard)
    langs = np.array([r.language for r in rows])
    en = langs == "en"
    np.testing.assert_allclose(routed.similarity[en], plain.similarity[en], atol=1e-6)
    np.testing.assert_allclose(routed.similarity[~en], only_other.similarity[~en], atol=1e-5)
    assert np.abs(routed.similarity[~en] - plain.similarity[~en]).max() > 1e-3
    np.testing.assert_allclose(routed.img_emb, plain.img_emb, atol=1e-6)  # primary's space


def test_shard_digest_mismatch_and_disagreement_are_shard_errors(tmp_path: Path) -> None:
    rows, _ = evaluation_rows()
    files = write_shard(tmp_path / "in", 9, rows[:4])
    bad = files.model_copy(update={"tar_sha256": "0" * 64})
    with pytest.raises(ShardError, match="sha256"):
        open_shard(bad, tmp_path)
    with tarfile.open(files.tar, "a") as tar:
        info = tarfile.TarInfo(f"{key_of(9, 99)}.jpg")
        info.size = 0
        tar.addfile(info)
    with pytest.raises(ShardError, match="disagree"):
        open_local_shard(Path(files.tar), Path(files.parquet))


def test_outputs_are_reproducible(shard_dir: Path, tmp_path: Path) -> None:
    shard = open_local_shard(shard_dir / "00000003.tar", shard_dir / "00000003.parquet")
    s = scorer(gap()["threshold"])
    for name in ("a", "b"):
        process_shard(s, shard, 3, OutputSettings(out_dir=tmp_path / name))
    assert (tmp_path / "a" / "00000003.tar").read_bytes() == \
        (tmp_path / "b" / "00000003.tar").read_bytes()
    assert not list((tmp_path / "a").glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["clip-probe", "efficientnet"])
def test_watermark_column_is_filled_when_weights_exist(tmp_path: Path, kind: str) -> None:
    from gpu_postprocess.watermark import build_efficientnet

    rows, _ = evaluation_rows()
    write_shard(tmp_path / "in", 4, rows[:6])
    if kind == "clip-probe":
        weights = tmp_path / "probe.npz"
        rng = np.random.default_rng(0)
        np.savez(weights, n_dense=1, dense_0_kernel=rng.standard_normal((32, 1)),
                 dense_0_bias=np.zeros(1))
    else:
        weights = tmp_path / "wm.pt"
        torch.save(build_efficientnet().state_dict(), weights)
    t = gap()["threshold"]
    s = build_scorer(ScoringSettings(
        model=ModelSpec(TINY_MODEL), device="cpu", workers=1, batch_size=4,
        thresholds=parse_thresholds([f"en={t}"]),
        watermark=WatermarkSettings(kind=WatermarkKind(kind), weights=weights)))
    shard = open_local_shard(tmp_path / "in" / "00000004.tar", tmp_path / "in" / "00000004.parquet")
    written = process_shard(s, shard, 4, OutputSettings(out_dir=tmp_path / "out"))
    table = pq.read_table(written.paths["parquet"]).to_pylist()
    values = [r["pwatermark"] for r in table]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert len(set(values)) > 1
