"""Reading the embeddings post-processing wrote, in clip-retrieval's layout.

``gpu_postprocess.outputs`` writes, per shard stem ``S`` (the batch id, 8 digits)::

    embeddings/img_emb/img_emb_S.npy          float16, L2-normalised, kept rows in key order
    embeddings/metadata/metadata_S.parquet    the same rows: url, caption, key, similarity,
                                              punsafe, pwatermark, NSFW, ...

A source folder is that ``embeddings`` folder, the post-processing output folder above it,
or a farm's ``--out`` folder (``postprocessed/embeddings``). Shards are
read in stem order (the order the page wants the parts concatenated in), each whole: a
shard is one batch, at most a few tens of thousands of rows.

NSFW rows are removed as the LAION2B/SISAP page says ("removing NSFW entries, marked in
metadata files"): a row whose ``NSFW`` label is ``NSFW`` is dropped, and so is one with no
label (``UNTAGGED``: no score), as the page's large subsets "remove missing values", unless
``keep_untagged``.

Error handling: a missing folder, a shard with an embeddings file but no metadata (or row
counts that differ), an unreadable file, or mixed widths raise ``SourceError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from knn.errors import SourceError

#: metadata columns carried into an index and an export, when the shard has them
METADATA_COLUMNS = ("key", "url", "caption", "similarity", "punsafe", "pwatermark", "NSFW")
NSFW_LABEL = "NSFW"
DONE_SUFFIX = "_postprocess.json"  # post-processing's last file for a shard
UNTAGGED_LABEL = "UNTAGGED"


@dataclass(frozen=True)
class ShardPart:
    """One shard's rows that survive the NSFW filter: vectors and metadata, aligned."""

    stem: str
    vectors: np.ndarray  # float16 (n, d)
    metadata: pa.Table  # n rows: METADATA_COLUMNS present in the shard, then "shard"
    dropped: int  # rows removed by the NSFW filter


def embeddings_folder(folder: Path) -> Path:
    """The folder holding ``img_emb/``: ``folder`` itself, its ``embeddings/``, or a farm
    ``--out`` folder's ``postprocessed/embeddings/``."""
    for root in (folder, folder / "embeddings", folder / "postprocessed" / "embeddings"):
        if (root / "img_emb").is_dir():
            return root
    raise SourceError(f"{folder}: no img_emb/ folder (post-processing's embeddings "
                      f"layout: embeddings/img_emb/img_emb_S.npy)")


def _order(stem: str) -> tuple[bool, int, str]:
    return (not stem.isdigit(), int(stem) if stem.isdigit() else 0, stem)


def list_shards(folder: Path) -> list[str]:
    """The finished shard stems with an embeddings file, in numeric order (post-processing
    names them by batch id, ``%08d``; ``pairfarm export clip-retrieval`` from 0 unpadded).

    In a post-processing output folder a shard is finished once its ``S_postprocess.json``
    (written last) is there: shards still being written are left for the next run."""
    root = embeddings_folder(folder)
    stems = sorted((p.name[len("img_emb_"):-len(".npy")] for p in (root / "img_emb").glob(
        "img_emb_*.npy")), key=_order)
    done = {s for s in stems if (root.parent / f"{s}{DONE_SUFFIX}").exists()}
    return [s for s in stems if s in done] if done else stems


def _keep_mask(table: pa.Table, keep_untagged: bool) -> np.ndarray:
    if "NSFW" not in table.column_names:
        return np.full(table.num_rows, keep_untagged)
    labels = np.array([v or UNTAGGED_LABEL for v in table.column("NSFW").to_pylist()],
                      dtype=object)
    keep = labels != NSFW_LABEL
    return keep if keep_untagged else keep & (labels != UNTAGGED_LABEL)


def _paths(root: Path, stem: str) -> tuple[Path, Path]:
    emb_path = root / "img_emb" / f"img_emb_{stem}.npy"
    meta_path = root / "metadata" / f"metadata_{stem}.parquet"
    if not meta_path.exists():
        raise SourceError(f"{emb_path} has no metadata file {meta_path}")
    return emb_path, meta_path


def _load(root: Path, stem: str) -> tuple[np.ndarray, pa.Table]:
    emb_path, meta_path = _paths(root, stem)
    try:
        vectors = np.load(emb_path)
        table = pq.read_table(meta_path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read shard {stem} in {root}: {exc}") from exc
    if vectors.ndim != 2 or vectors.shape[0] != table.num_rows:
        raise SourceError(f"shard {stem}: {vectors.shape} embeddings for "
                          f"{table.num_rows} metadata rows")
    return vectors, table


def read_shard(folder: Path, stem: str, *, keep_untagged: bool = False) -> ShardPart:
    """One shard's vectors (float16) and metadata with NSFW rows removed."""
    vectors, table = _load(embeddings_folder(folder), stem)
    keep = _keep_mask(table, keep_untagged)
    columns = [c for c in METADATA_COLUMNS if c in table.column_names]
    meta = table.select(columns).filter(pa.array(keep))
    meta = meta.append_column("shard", pa.array([stem] * meta.num_rows, pa.string()))
    return ShardPart(stem, np.ascontiguousarray(vectors[keep], dtype=np.float16), meta,
                     int((~keep).sum()))


def iter_shards(folder: Path, stems: Sequence[str], *,
                keep_untagged: bool = False) -> Iterator[ShardPart]:
    """``read_shard`` for each stem in order; every part has the first one's width."""
    width = None
    for stem in stems:
        part = read_shard(folder, stem, keep_untagged=keep_untagged)
        width = width or part.vectors.shape[1]
        if part.vectors.shape[1] != width:
            raise SourceError(f"shard {stem} has {part.vectors.shape[1]}-d embeddings, "
                              f"the shards before it {width}-d")
        yield part


def kept_rows(folder: Path, stem: str, *, keep_untagged: bool = False) -> tuple[int, int]:
    """(rows kept, rows dropped) of one shard, from its metadata alone."""
    _, path = _paths(embeddings_folder(folder), stem)
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=["NSFW"] if "NSFW" in names else [])
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    keep = _keep_mask(table, keep_untagged) if table.num_columns else \
        np.full(pq.read_metadata(path).num_rows, keep_untagged)
    return int(keep.sum()), int((~keep).sum())


def width(folder: Path, stem: str) -> int:
    """The embedding width of a shard, from its .npy header."""
    path = embeddings_folder(folder) / "img_emb" / f"img_emb_{stem}.npy"
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    if len(shape) != 2:
        raise SourceError(f"{path}: shape {shape}, expected (rows, width)")
    return int(shape[1])
