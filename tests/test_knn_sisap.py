"""pairfarm export sisap: the files checked with h5py against brute force."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from knn.errors import SisapError
from knn.sisap import SisapSettings, export_sisap, size_label
from tests.knn_data import clustered, write_embeddings

D, K = 128, 100
NSFW_EVERY = 9


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("sisap")
    x = clustered(1500, D, seed=7)
    write_embeddings(root / "farm", x, 300, nsfw_every=NSFW_EVERY)  # 5 shards, first: queries
    export_sisap(root / "farm", root / "out", SisapSettings(queries=40, seed=3))
    return root / "out", x.astype(np.float16)


def _db(x: np.ndarray) -> np.ndarray:
    """Rows 300.. (parts 1-4) without the NSFW-labelled ones, in order."""
    return x[300:][np.arange(300, len(x)) % NSFW_EVERY != NSFW_EVERY - 1]


def _read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.array(f[name])


def test_database_is_the_parts_after_the_first_in_order_without_nsfw(
        exported: tuple[Path, np.ndarray]) -> None:
    out, x = exported
    db = _db(x)
    n = len(db)
    emb = _read(out / f"laion2B-en-clip{D}v2-n={n}.h5", "emb")
    assert emb.dtype == np.float16 and emb.shape == (n, D)
    np.testing.assert_array_equal(emb, db)
    with open(out / f"meta-{n}.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["id"]) for r in rows] == list(range(1, n + 1))
    assert rows[0]["url"] == "http://127.0.0.1/00000002/0.jpg" and rows[0]["NSFW"] == "UNLIKELY"
    assert {r["NSFW"] for r in rows} == {"UNLIKELY"}


def test_queries_come_from_the_first_part(exported: tuple[Path, np.ndarray]) -> None:
    out, x = exported
    q = _read(out / "public-queries-40-clip128v2.h5", "emb")
    part0 = x[:300][np.arange(300) % NSFW_EVERY != 8]
    assert q.shape == (40, D) and q.dtype == np.float16
    assert all((part0 == row).all(1).any() for row in q)
    assert len({row.tobytes() for row in q}) == 40


@pytest.mark.parametrize(("suffix", "dtype"), [("", np.float32), ("-F64-IEEE754", np.float64)])
def test_gold_standard_matches_brute_force(exported: tuple[Path, np.ndarray], suffix: str,
                                           dtype: type) -> None:
    out, x = exported
    db = _db(x).astype(np.float64)
    q = _read(out / "public-queries-40-clip128v2.h5", "emb").astype(np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cos = q @ db.T
    want = np.argsort(-cos, axis=1, kind="stable")[:, :K]
    path = out / f"laion2B-en-public-gold-standard-v2-{len(db)}{suffix}.h5"
    knns, dists = _read(path, "knns"), _read(path, "dists")
    assert knns.dtype == np.int32 and dists.dtype == dtype
    assert knns.shape == dists.shape == (40, K)  # a row per query: h5py's view of (k, q)
    assert knns.min() == 1  # 1-based ids
    np.testing.assert_array_equal(knns - 1, want)
    np.testing.assert_allclose(dists, 1 - np.take_along_axis(cos, want, 1),
                               atol=1e-6 if dtype == np.float32 else 1e-12)
    assert (np.diff(dists, axis=1) >= 0).all()


def test_pca_projections_keep_the_top_variance(exported: tuple[Path, np.ndarray]) -> None:
    out, x = exported
    db = _db(x).astype(np.float64)
    eig = np.sort(np.linalg.eigvalsh(np.cov(db.T, bias=True)))[::-1]
    for k in (32, 96):
        path = out / f"laion2B-en-pca{k}v2-n={len(db)}.h5"
        proj, comps, mean = _read(path, f"pca{k}"), _read(path, "components"), _read(path, "mean")
        assert proj.dtype == np.float32 and proj.shape == (len(db), k)
        np.testing.assert_allclose(mean, db.mean(0), atol=1e-9)
        np.testing.assert_allclose(comps @ comps.T, np.eye(k), atol=1e-9)
        np.testing.assert_allclose(proj, (db - mean) @ comps.T, atol=1e-5)
        np.testing.assert_allclose(proj.astype(np.float64).var(0), eig[:k], rtol=1e-4,
                                   atol=1e-9)
        q = _read(out / "public-queries-40-clip128v2.h5", "emb").astype(np.float64)
        np.testing.assert_allclose(_read(out / f"public-queries-40-pca{k}v2.h5", f"pca{k}"),
                                   (q - mean) @ comps.T, atol=1e-5)


def test_sketches_are_sign_bits_whose_hamming_distance_estimates_the_angle(
        exported: tuple[Path, np.ndarray]) -> None:
    out, x = exported
    db = _db(x).astype(np.float64)
    path = out / f"laion2B-en-hammingv2-n={len(db)}.h5"
    ham, planes, mean = _read(path, "hamming"), _read(path, "planes"), _read(path, "mean")
    assert ham.dtype == np.uint64 and ham.shape == (len(db), 16) and planes.shape == (D, 1024)
    bits = np.unpackbits(ham.view(np.uint8), axis=1, bitorder="little").astype(bool)
    np.testing.assert_array_equal(bits, (db - mean) @ planes > 0)
    assert bits.mean(0).min() > 0.3 and bits.mean(0).max() < 0.7  # centred: balanced bits
    c = db - mean
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    angle = np.arccos(np.clip(c[:50] @ c[50:100].T, -1, 1)) / np.pi
    hamming = (bits[:50, None, :] != bits[None, 50:100, :]).mean(2)
    assert np.abs(hamming - angle).max() < 0.06


def test_size_labels() -> None:
    assert [size_label(n) for n in (100_000, 10_000_000, 1234)] == ["100K", "10M", "1234"]


def test_a_source_with_only_the_query_part_is_refused(tmp_path: Path) -> None:
    write_embeddings(tmp_path / "farm", clustered(100, D), 100)
    with pytest.raises(SisapError, match="the database needs at least one more"):
        export_sisap(tmp_path / "farm", tmp_path / "out", SisapSettings())
    assert not (tmp_path / "out").exists()
