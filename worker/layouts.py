"""Where a shard's successful samples go: img2dataset's ``output_format`` layouts.

Every layout also has the shard's ``{N:08d}.parquet`` (one row per candidate) and
``{N:08d}_stats.json`` (written last), which ``worker.shards.ShardWriter`` writes; a
layout only holds the image, caption and metadata of each ``ok`` sample:

- ``webdataset`` (``TarMembers``): ``{N:08d}.tar`` with ``KEY.jpg|png|webp``, ``KEY.txt``,
  ``KEY.json`` (the farm's layout; the only one ``pairfarm worker`` writes);
- ``files`` (``FolderMembers``): the same three files per sample in a folder
  ``{N:08d}/``, as img2dataset's ``files`` output;
- ``parquet`` (``ParquetMembers``): no other file: the shard parquet gets the image
  bytes in a binary column named after the encode format and the caption in ``txt``
  (null for failures), as img2dataset's ``parquet`` output.

Resource handling: each layout writes under a hidden temporary name
(``.{N:08d}.tar.tmp-<id>``, ``.{N:08d}.tmp-<id>/``; the parquet layout spools the images
in a local temporary file until the parquet is written) and ``publish`` renames it to
its final name, replacing what an interrupted earlier run left there; ``abort`` removes
it. All blocking: called from a thread.

Error handling: storage errors surface as ``OSError`` / ``ValueError``; the shard writer
turns them into ``ShardWriteError``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from typing import IO, Any, Protocol

import fsspec
import pyarrow as pa

from worker.settings import LAYOUTS

_MTIME = 0  # reproducible tars: every member has the same timestamp


class Members(Protocol):
    """The ``ok`` samples of one shard, in one layout."""

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        """Write one sample: ``(extension, bytes)`` of its image, ``txt`` and ``json``."""
        ...

    def close(self) -> None:
        """Finish the temporary copy (before the parquet is written)."""
        ...

    def publish(self) -> None:
        """Move the temporary copy to its final name."""
        ...

    def abort(self) -> None:
        """Drop the temporary copy (best effort)."""
        ...

    def parquet_columns(self, keys: list[str]) -> dict[str, pa.Array]:
        """Columns this layout adds to the shard parquet for the rows of ``keys``."""
        ...


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += len(view)
        self._target.write(view)
        return len(view)


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        return


class TarMembers:
    """A webdataset tar streamed to ``tmp``, renamed to ``final``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
        self._fs, self._tmp, self._final = fs, tmp, final
        self._file = fs.open(tmp, "wb")
        self.hasher = HashingWriter(self._file)
        # closed by close() or abort(): the members own the open tar across calls
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self.hasher, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        for ext, data in files:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def publish(self) -> None:
        self._fs.mv(self._tmp, self._final)

    def abort(self) -> None:
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except (OSError, ValueError):
                continue
        _remove(self._fs, self._tmp)

    def parquet_columns(self, keys: list[str]) -> dict[str, pa.Array]:
        return {}


class FolderMembers:
    """One file per member in the folder ``tmp``, renamed to ``final``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
        self._fs, self._tmp, self._final = fs, tmp, final
        fs.makedirs(tmp, exist_ok=True)

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        for ext, data in files:
            with self._fs.open(f"{self._tmp}/{key}.{ext}", "wb") as out:
                out.write(data)

    def close(self) -> None:
        return

    def publish(self) -> None:
        _remove(self._fs, self._final)  # an interrupted run's folder: never merged into
        self._fs.mv(self._tmp, self._final, recursive=True)

    def abort(self) -> None:
        _remove(self._fs, self._tmp)

    def parquet_columns(self, keys: list[str]) -> dict[str, pa.Array]:
        return {}


class ParquetMembers:
    """Images spooled in a local temporary file, read back into the shard parquet."""

    def __init__(self, image_ext: str) -> None:
        self._image_ext = image_ext
        # closed by close() / abort() after the parquet is written
        self._spool = tempfile.TemporaryFile(prefix="pairfarm-shard-")  # noqa: SIM115
        self._where: dict[str, tuple[int, int, str]] = {}

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        parts = dict(files)
        image = parts[self._image_ext]
        self._spool.seek(0, io.SEEK_END)
        self._where[key] = (self._spool.tell(), len(image), parts["txt"].decode())
        self._spool.write(image)

    def close(self) -> None:
        self._spool.flush()

    def publish(self) -> None:
        self._spool.close()

    def abort(self) -> None:
        self._spool.close()

    def parquet_columns(self, keys: list[str]) -> dict[str, pa.Array]:
        images = [self._read(key) for key in keys]
        captions = [self._where[key][2] if key in self._where else None for key in keys]
        return {self._image_ext: pa.array(images, type=pa.binary()),
                "txt": pa.array(captions, type=pa.string())}

    def _read(self, key: str) -> bytes | None:
        if key not in self._where:
            return None
        offset, size, _ = self._where[key]
        self._spool.seek(offset)
        return self._spool.read(size)


def open_members(layout: str, fs: fsspec.AbstractFileSystem, tmp: str, final: str,
                 image_ext: str) -> Members:
    """The ``layout``'s members, writing under ``tmp`` (``final`` once published)."""
    if layout == "webdataset":
        return TarMembers(fs, tmp, final)
    if layout == "files":
        return FolderMembers(fs, tmp, final)
    if layout == "parquet":
        return ParquetMembers(image_ext)
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
