"""Post-processing's embeddings folder, written in its real layout for the knn tests.

``write_embeddings`` writes ``embeddings/img_emb/img_emb_S.npy`` (float16 unit rows) and
``embeddings/metadata/metadata_S.parquet`` (key, url, caption, similarity, punsafe,
pwatermark, NSFW) as ``gpu_postprocess.outputs.write_outputs`` does, for vectors drawn
around a few random centres (clustered, as CLIP embeddings are).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def clustered(n: int, d: int, *, centres: int = 16, spread: float = 0.6,
              seed: int = 0) -> np.ndarray:
    """n unit float32 rows around ``centres`` random unit centres."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shard(root: Path, stem: str, vectors: np.ndarray, labels: list[str | None]) -> None:
    emb = root / "embeddings"
    (emb / "img_emb").mkdir(parents=True, exist_ok=True)
    (emb / "metadata").mkdir(parents=True, exist_ok=True)
    np.save(emb / "img_emb" / f"img_emb_{stem}.npy", vectors.astype(np.float16))
    n = len(vectors)
    pq.write_table(pa.table({
        "key": [f"{i:09d}" for i in range(n)],
        "url": [f"http://127.0.0.1/{stem}/{i}.jpg" for i in range(n)],
        "caption": [f"caption {stem} {i}" for i in range(n)],
        "similarity": pa.array(np.linspace(0.2, 0.4, n), pa.float32()),
        "punsafe": pa.array([0.95 if lab == "NSFW" else 0.01 for lab in labels], pa.float32()),
        "pwatermark": pa.array(np.zeros(n), pa.float32()),
        "NSFW": pa.array(labels, pa.string()),
    }), emb / "metadata" / f"metadata_{stem}.parquet")


def write_embeddings(root: Path, vectors: np.ndarray, shard_rows: int, *,
                     nsfw_every: int = 0, first_batch: int = 1) -> list[str]:
    """Split ``vectors`` into shards of ``shard_rows``; every ``nsfw_every``-th row is
    labelled NSFW (0: none). Returns the stems written."""
    stems = []
    for j, start in enumerate(range(0, len(vectors), shard_rows)):
        chunk = vectors[start:start + shard_rows]
        labels: list[str | None] = [
            "NSFW" if nsfw_every and (start + i) % nsfw_every == nsfw_every - 1 else "UNLIKELY"
            for i in range(len(chunk))]
        stem = f"{first_batch + j:08d}"
        write_shard(root, stem, chunk, labels)
        stems.append(stem)
    return stems
