"""The farm output an export reads: a folder of finished shards, one per batch id.

Two kinds, told apart by their files (``open_source``):

- ``postprocessed`` (``pairfarm postprocess --out``): ``S.tar`` holds the kept samples,
  ``S.parquet`` every row with ``keep``, ``embeddings/`` the kept rows' embeddings;
  ``S_postprocess.json`` marks the shard done. Exported: the kept rows.
- ``download`` (``pairfarm worker`` / ``download``): ``S.tar`` holds the downloaded
  samples, ``S.parquet`` every row with ``status``; ``S_stats.json`` marks it done.
  Exported: the ``success`` rows. No embeddings.

A farm's ``--out`` folder (``pairfarm up``) is read through its ``postprocessed/`` folder
when it has one, else its ``shards/`` folder. Samples come in parquet row order.

The folder is a local path or an fsspec URL (``s3://bucket/farm``: where ``pairfarm
worker --output`` put the shards); everything is read through its fsspec filesystem, a
tar with one open file that is indexed, then read member by member with seeks.

Error handling: a missing or unreadable file (``OSError`` and fsspec's ``ValueError``s),
or a tar that lacks a selected row's image, raises ``SourceError`` naming the file.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from export.errors import SourceError
from pairfarm.shardformat import STATUS_SUCCESS, embedding_files, shard_stem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "webp", "png")


class SourceKind(StrEnum):
    DOWNLOAD = "download"
    POSTPROCESSED = "postprocessed"


#: the file whose presence marks a batch's shard finished, by kind
DONE_MARKER = {SourceKind.DOWNLOAD: re.compile(r"^(\d{8})_stats\.json$"),
               SourceKind.POSTPROCESSED: re.compile(r"^(\d{8})_postprocess\.json$")}


@dataclass(frozen=True)
class Sample:
    """One exported sample as its farm shard holds it."""

    batch_id: int
    row: int  # row of its shard's parquet
    image_ext: str
    image: bytes
    caption: str
    meta: dict[str, Any]  # the tar's json member
    record: dict[str, Any]  # the parquet row
    img_emb: np.ndarray | None = None
    text_emb: np.ndarray | None = None


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass(frozen=True)
class Source:
    fs: fsspec.AbstractFileSystem
    root: str  # the shard folder, in ``fs``'s terms
    kind: SourceKind

    @property
    def folder(self) -> str:
        """The shard folder as the user names it (a path or a URL)."""
        return str(self.fs.unstrip_protocol(self.root)) if _remote(self.fs) else self.root

    @property
    def has_embeddings(self) -> bool:
        return self.kind is SourceKind.POSTPROCESSED

    def done_batches(self) -> list[int]:
        """Batch ids whose shard is finished, ascending (any set: gaps are fine)."""
        pattern = DONE_MARKER[self.kind]
        return sorted(int(m.group(1)) for name in _names(self.fs, self.root)
                      if (m := pattern.match(name)))

    def selected_rows(self, batch_id: int) -> list[int]:
        """Parquet rows of the batch that the export takes, in order."""
        return _selected(self.kind, self._table(batch_id, ["status", "keep"]))

    def samples(self, batch_id: int, *, skip: int = 0,
                rows: set[int] | None = None) -> Iterator[Sample]:
        """The batch's exported samples in row order, less the first ``skip``, or only
        those at ``rows``."""
        table = self._table(batch_id)
        selected = _selected(self.kind, table)
        emb = self._embeddings(batch_id, len(selected))
        tar_path = self._path(batch_id, ".tar")
        records = table.to_pylist()
        with _open(self.fs, tar_path) as tar_file:
            index = _index_tar(tar_file, tar_path)
            for n, row in enumerate(selected):
                if n < skip or (rows is not None and row not in rows):
                    continue
                parts = index.get(str(records[row]["key"]), {})
                yield _sample(batch_id, row, records[row], parts=parts, tar_file=tar_file,
                              tar_path=tar_path,
                              emb=None if emb is None else (emb[0][n], emb[1][n]))

    def _path(self, batch_id: int, suffix: str) -> str:
        return f"{self.root}/{shard_stem(batch_id)}{suffix}"

    def _table(self, batch_id: int, columns: list[str] | None = None) -> pa.Table:
        path = self._path(batch_id, ".parquet")
        try:
            with self.fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
                wanted = None if columns is None else [c for c in columns if c in schema.names]
                f.seek(0)
                return pq.read_table(f, columns=wanted)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read {path}: {exc}") from exc

    def _embeddings(self, batch_id: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.has_embeddings:
            return None
        files = embedding_files(shard_stem(batch_id))
        img, txt = (_load_npy(self.fs, f"{self.root}/embeddings/{files[name]}")
                    for name in ("img_emb", "text_emb"))
        if len(img) != n or len(txt) != n:
            raise SourceError(f"{self.folder}: batch {batch_id} has {n} kept rows but "
                              f"{len(img)} image and {len(txt)} text embeddings")
        return img, txt


def open_source(location: str | Path) -> Source:
    """The source at ``location`` (a local path or an fsspec URL): a farm's ``--out``
    folder or a folder of shards."""
    try:
        fs, root = fsspec.core.url_to_fs(str(location))
        root = root.rstrip("/") or root
        if not _remote(fs):
            root = posixpath.normpath(root)  # one name per folder: the manifest keeps it
        if not fs.isdir(root):
            raise SourceError(f"{location} is not a folder")
        for sub, kind in (("postprocessed", SourceKind.POSTPROCESSED),
                          ("shards", SourceKind.DOWNLOAD)):
            if fs.isdir(f"{root}/{sub}"):
                return Source(fs, f"{root}/{sub}", kind)
        names = _names(fs, root)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"cannot read {location}: {exc}") from exc
    if "embeddings" in names or any(DONE_MARKER[SourceKind.POSTPROCESSED].match(n)
                                    for n in names):
        return Source(fs, root, SourceKind.POSTPROCESSED)
    if any(DONE_MARKER[SourceKind.DOWNLOAD].match(n) for n in names):
        return Source(fs, root, SourceKind.DOWNLOAD)
    raise SourceError(f"{location} holds no farm shards (no NNNNNNNN_stats.json nor "
                      "NNNNNNNN_postprocess.json, no shards/ or postprocessed/ folder)")


def _remote(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" not in fs.protocol if isinstance(fs.protocol, tuple) else fs.protocol != "file"


def _names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The names of the entries of ``folder`` (fresh: no listing cached by fsspec)."""
    try:
        fs.invalidate_cache(folder)
        return [PurePosixPath(p.rstrip("/")).name for p in fs.ls(folder, detail=False)]
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot list {folder}: {exc}") from exc


def _selected(kind: SourceKind, table: pa.Table) -> list[int]:
    if kind is SourceKind.POSTPROCESSED:
        if "keep" not in table.column_names:
            raise SourceError("a post-processed parquet without its keep column")
        return [i for i, k in enumerate(table.column("keep").to_pylist()) if k]
    return [i for i, s in enumerate(table.column("status").to_pylist()) if s == STATUS_SUCCESS]


def _load_npy(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    try:
        with fs.open(path, "rb") as f:
            return np.load(io.BytesIO(f.read()))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def _open(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        return fs.open(path, "rb")
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def _index_tar(tar_file: Any, path: str) -> dict[str, dict[str, Member]]:
    """key -> extension -> where the member's bytes are in the open ``tar_file``."""
    index: dict[str, dict[str, Member]] = {}
    try:
        with tarfile.open(fileobj=tar_file, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    key, _, ext = PurePosixPath(info.name).name.partition(".")
                    index.setdefault(key, {})[ext.lower()] = Member(info.offset_data, info.size)
    except (OSError, ValueError, tarfile.TarError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    return index


def _read(tar_file: Any, member: Member) -> bytes:
    try:
        tar_file.seek(member.offset)
        data: bytes = tar_file.read(member.size)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {tar_file.path}: {exc}") from exc
    return data


def _sample(batch_id: int, row: int, record: dict[str, Any], *, parts: dict[str, Member],
            tar_file: Any, tar_path: str,
            emb: tuple[np.ndarray, np.ndarray] | None) -> Sample:
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if ext is None:
        raise SourceError(f"{tar_path}: no image for key {record['key']} (parquet row {row})")
    meta = _read_json(tar_file, parts["json"]) if "json" in parts else {}
    caption = _read(tar_file, parts["txt"]).decode() if "txt" in parts else \
        str(record.get("caption") or "")
    return Sample(batch_id=batch_id, row=row, image_ext=ext,
                  image=_read(tar_file, parts[ext]), caption=caption, meta=meta,
                  record=record, img_emb=None if emb is None else emb[0],
                  text_emb=None if emb is None else emb[1])


def _read_json(tar_file: Any, member: Member) -> dict[str, Any]:
    try:
        value = json.loads(_read(tar_file, member))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
