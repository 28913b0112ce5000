"""Writing a scored shard: filtered webdataset, metadata parquet, embeddings, stats.

For a shard with stem ``S`` (``pairfarm.shardformat.shard_stem``) under ``out_dir``::

    S.tar                                  kept samples only; json gains similarity,
                                           punsafe, pwatermark, nsfw
    S.parquet                              every candidate row, its scores, keep, drop_reason
    embeddings/img_emb/img_emb_S.npy       float16, L2-normalised, kept rows in key order
    embeddings/text_emb/text_emb_S.npy     (clip-retrieval's layout: embedding-reader and
    embeddings/metadata/metadata_S.parquet  autofaiss read it), aligned row for row
    S_stats.json                           img2dataset's stats keys (``shard_stats``):
                                           successes = kept samples
    S_postprocess.json                     counts over the shard's samples (kept + dropped =
                                           its ok rows) and histogram; written last: "done"

The embedding file names are ``pairfarm.shardformat.embedding_files``. Dataset layouts
(TFDS ``laion400m``, clip-retrieval, webdataset numbered from 0) are made from this
folder by ``pairfarm export`` (``export/``).

Every file is written under a temporary name in its folder and renamed when complete.

Error handling: file system errors raise ``OutputError``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpu_postprocess.errors import OutputError
from gpu_postprocess.nsfw import nsfw_label
from gpu_postprocess.pipeline import Decisions, ShardScores
from gpu_postprocess.scoring import similarity_histogram, to_fp16_unit
from gpu_postprocess.shardio import Shard
from pairfarm.shardformat import (
    STATUS_FAILED_TO_DOWNLOAD,
    STATUS_FAILED_TO_RESIZE,
    STATUS_SUCCESS,
    embedding_files,
    shard_stem,
    stats_name,
)
from pairfarm.staging import replacing

TAR_MTIME = 0  # reproducible tars


@dataclass(frozen=True)
class Tags:
    """Per shard row: similarity, punsafe, pwatermark (NaN where not scored)."""

    similarity: np.ndarray
    punsafe: np.ndarray
    pwatermark: np.ndarray

    @classmethod
    def of(cls, n: int, scores: ShardScores, decisions: Decisions) -> Tags:
        punsafe = np.full(n, np.nan, dtype=np.float32)
        pwatermark = np.full(n, np.nan, dtype=np.float32)
        punsafe[scores.rows] = scores.punsafe
        pwatermark[scores.rows] = scores.pwatermark
        return cls(decisions.similarity, punsafe, pwatermark)


def _nullable(x: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in x.tolist()]


@contextlib.contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success
    (``pairfarm.staging.replacing``)."""
    try:
        with replacing(path) as tmp:
            yield tmp
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _sample_json(shard: Shard, key: str, row: int, tags: Tags) -> bytes:
    parts = shard.members.get(key, {})
    meta: dict[str, Any] = json.loads(shard.read(parts["json"])) if "json" in parts else {}
    meta.update(similarity=_nullable(tags.similarity[row : row + 1])[0],
                punsafe=_nullable(tags.punsafe[row : row + 1])[0],
                pwatermark=_nullable(tags.pwatermark[row : row + 1])[0],
                nsfw=nsfw_label(float(tags.punsafe[row])).value)
    return json.dumps(meta, sort_keys=True).encode()


def write_filtered_tar(shard: Shard, keep: np.ndarray, tags: Tags, path: Path) -> None:
    keys = shard.keys
    captions = shard.column("caption")
    with atomic(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for row in np.flatnonzero(keep).tolist():
            key = keys[row]
            ext, member = shard.image_member(key)
            _add(tar, f"{key}.{ext}", shard.read(member))
            _add(tar, f"{key}.txt", str(captions[row] or "").encode())
            _add(tar, f"{key}.json", _sample_json(shard, key, row, tags))


def metadata_table(shard: Shard, decisions: Decisions, tags: Tags) -> pa.Table:
    """The shard's parquet with the scores, the threshold applied and the decision."""
    table = shard.table
    for name in ("similarity", "threshold", "punsafe", "pwatermark", "NSFW", "keep",
                 "drop_reason"):
        if name in table.column_names:
            table = table.drop_columns([name])
    reason = [r or None for r in decisions.reason]
    return (table
            .append_column("similarity", pa.array(_nullable(tags.similarity), pa.float32()))
            .append_column("threshold", pa.array(decisions.threshold, pa.float32()))
            .append_column("punsafe", pa.array(_nullable(tags.punsafe), pa.float32()))
            .append_column("pwatermark", pa.array(_nullable(tags.pwatermark), pa.float32()))
            .append_column("NSFW", pa.array([nsfw_label(float(p)).value for p in tags.punsafe]))
            .append_column("keep", pa.array(decisions.keep))
            .append_column("drop_reason", pa.array(reason, pa.string())))


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic(path) as tmp:
        pq.write_table(table, tmp)


def _write_npy(array: np.ndarray, path: Path) -> None:
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def kept_embeddings(scores: ShardScores, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 unit image and text embeddings of the kept rows, in row order."""
    sel = keep[scores.rows]
    return to_fp16_unit(scores.img_emb[sel]), to_fp16_unit(scores.text_emb[sel])


@dataclass(frozen=True)
class Written:
    """What ``write_outputs`` wrote: name -> path, and the summary it wrote last."""

    paths: dict[str, str]
    summary: dict[str, Any]


def write_outputs(shard: Shard, batch_id: int, scores: ShardScores, decisions: Decisions, *,
                  out_dir: Path) -> Written:
    stem = shard_stem(batch_id)
    n = shard.table.num_rows
    tags = Tags.of(n, scores, decisions)
    meta = metadata_table(shard, decisions, tags)
    img, txt = kept_embeddings(scores, decisions.keep)
    emb = out_dir / "embeddings"
    paths = {"tar": out_dir / f"{stem}.tar", "parquet": out_dir / f"{stem}.parquet",
             **{name: emb / path for name, path in embedding_files(stem).items()}}
    write_filtered_tar(shard, decisions.keep, tags, paths["tar"])
    _write_parquet(meta, paths["parquet"])
    _write_npy(img, paths["img_emb"])
    _write_npy(txt, paths["text_emb"])
    _write_parquet(meta.filter(pa.array(decisions.keep)), paths["metadata"])
    paths["stats"] = out_dir / stats_name(batch_id)
    with atomic(paths["stats"]) as tmp:
        tmp.write_text(json.dumps(shard_stats(shard, decisions), indent=1))
    summary = summarize(decisions, scores, {k: str(v) for k, v in paths.items()})
    done = out_dir / f"{stem}_postprocess.json"
    with atomic(done) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    paths["summary"] = done
    return Written({k: str(v) for k, v in paths.items()}, summary)


def shard_stats(shard: Shard, decisions: Decisions) -> dict[str, Any]:
    """img2dataset's stats keys for the filtered tar: ``successes`` = kept samples; the
    download's failures as the download shard counted them; ``status_dict`` keys each
    row: ``success`` (kept), its outcome class (a failed download) or its drop reason,
    summing to ``count``. No times: the download shard's stats json has them."""
    statuses = Counter(shard.column("status"))
    keep = decisions.keep.tolist()
    status_dict = Counter(
        STATUS_SUCCESS if kept else (error or decisions.reason[r] or "dropped")
        for r, (kept, error) in enumerate(zip(keep, shard.column("error_class"), strict=True)))
    return {"count": shard.table.num_rows, "successes": int(sum(keep)),
            "failed_to_download": statuses[STATUS_FAILED_TO_DOWNLOAD],
            "failed_to_resize": statuses[STATUS_FAILED_TO_RESIZE],
            "dropped": statuses[STATUS_SUCCESS] - int(sum(keep)),
            "status_dict": dict(sorted(status_dict.items()))}


def summarize(decisions: Decisions, scores: ShardScores, paths: dict[str, str]) -> dict[str, Any]:
    """Counts over the shard's samples (its ``ok`` rows: failed downloads were counted by
    the download report and are not dropped here), as the completion report carries them."""
    reasons: dict[str, int] = {}
    for r in scores.rows.tolist():
        if reason := decisions.reason[r]:
            reasons[reason] = reasons.get(reason, 0) + 1
    hist = similarity_histogram(scores.similarity[~np.isnan(scores.similarity)])
    kept = int(decisions.keep.sum())
    return {"kept": kept, "dropped": len(scores.rows) - kept, "drop_reasons": reasons,
            "similarity_edges": hist.edges, "similarity_counts": hist.counts,
            "outputs": paths}
