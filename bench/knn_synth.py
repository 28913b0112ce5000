"""A clustered synthetic stand-in for CLIP image embeddings, in post-processing's layout.

``vectors(n, d, seed)``: unit rows drawn as

    x = normalise(common + centre_j + spread * (z @ B) / sqrt(r) + noise * e / sqrt(d))

- ``common``: one unit direction every row shares (CLIP embeddings of a dataset have a
  large common component: their mean has norm ~0.5-0.7);
- ``centre_j``: one of ``clusters`` (1,000) random unit directions, picked with
  Zipf-like weights (a few large clusters, a long tail), times 0.8;
- ``z @ B``: Gaussian coordinates in a random ``r``-dimensional subspace (r = 48,
  ``spread`` 0.9), so that the data has a low intrinsic dimension as real embeddings
  do, plus isotropic noise ``e`` (``noise`` 0.15) in all d dimensions.

The dataset's structure (common, centres, weights, B) depends only on ``--structure-seed``
and d; rows are drawn in chunks from ``seed``, so the database (seed 0) and the query set
(seed 1) come from the same distribution but share no row. ``write_layout`` writes the
rows as ``embeddings/img_emb/img_emb_S.npy`` (float16) + ``embeddings/metadata/
metadata_S.parquet`` per shard of ``shard_rows``, as ``gpu_postprocess.outputs`` does, so
that ``pairfarm index`` and autofaiss (embedding-reader) read the same files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLUSTERS, SUBSPACE, SPREAD, NOISE, CENTRE = 1000, 48, 0.9, 0.15, 0.8
CHUNK = 50_000


@dataclass(frozen=True)
class Structure:
    common: np.ndarray
    centres: np.ndarray
    weights: np.ndarray
    basis: np.ndarray

    @classmethod
    def make(cls, d: int, seed: int = 42) -> Structure:
        rng = np.random.default_rng(seed)
        unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        weights = 1 / np.arange(1, CLUSTERS + 1) ** 0.8
        return cls(unit(rng.standard_normal(d)), unit(rng.standard_normal((CLUSTERS, d))),
                   weights / weights.sum(), np.linalg.qr(rng.standard_normal((d, SUBSPACE)))[0].T)


def chunks(n: int, d: int, seed: int, structure: Structure) -> Iterator[np.ndarray]:
    """n unit float32 rows, CHUNK at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        j = rng.choice(CLUSTERS, size=m, p=structure.weights)
        x = (structure.common + CENTRE * structure.centres[j]
             + SPREAD * (rng.standard_normal((m, SUBSPACE)) @ structure.basis) / np.sqrt(SUBSPACE)
             + NOISE * rng.standard_normal((m, d)) / np.sqrt(d))
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors(n: int, d: int, seed: int, structure: Structure) -> np.ndarray:
    return np.concatenate(list(chunks(n, d, seed, structure)))


def write_layout(root: Path, n: int, d: int, shard_rows: int, structure: Structure) -> None:
    """The database (seed 0) in post-processing's embeddings layout under ``root``."""
    emb, meta = root / "embeddings" / "img_emb", root / "embeddings" / "metadata"
    emb.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    rows = np.concatenate(list(chunks(n, d, 0, structure))).astype(np.float16)
    for shard, start in enumerate(range(0, n, shard_rows), 1):
        part = rows[start:start + shard_rows]
        stem = f"{shard:08d}"
        np.save(emb / f"img_emb_{stem}.npy", part)
        pq.write_table(pa.table({
            "key": [f"{i:09d}" for i in range(len(part))],
            "url": [f"http://127.0.0.1/{stem}/{i}.jpg" for i in range(len(part))],
            "caption": [f"synthetic {stem} {i}" for i in range(len(part))],
            "NSFW": ["UNLIKELY"] * len(part)}), meta / f"metadata_{stem}.parquet")
