"""Reading a download shard (``pairfarm.shardformat``): the tar's index and the parquet.

The tar is indexed once (member offsets), not unpacked: decode workers read each image
with one ``seek`` + ``read`` of the tar file. Remote shards (any fsspec URL) are copied to
a local work folder first; local paths and ``file://`` URLs are read in place.

Error handling: a missing file, a digest that differs from the lease's, an unreadable tar
or parquet, or a tar that disagrees with its parquet raise ``ShardError``.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gpu_postprocess.errors import ShardError
from pairfarm.protocol import ShardFiles
from pairfarm.shardformat import STATUS_SUCCESS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "webp", "png")


@dataclass(frozen=True)
class Member:
    """Where a member's bytes are in the tar."""

    offset: int
    size: int


@dataclass
class Shard:
    """A download shard, indexed. ``table`` has one row per candidate, in key order."""

    tar_path: Path
    table: pa.Table
    members: dict[str, dict[str, Member]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [str(k) for k in self.table.column("key").to_pylist()]

    def ok_rows(self) -> list[int]:
        """Row indices whose download succeeded (they have an image in the tar)."""
        return [i for i, s in enumerate(self.table.column("status").to_pylist())
                if s == STATUS_SUCCESS]

    def image_member(self, key: str) -> tuple[str, Member]:
        parts = self.members.get(key, {})
        for ext in IMAGE_EXTENSIONS:
            if ext in parts:
                return ext, parts[ext]
        raise ShardError(f"{self.tar_path}: no image for key {key}")

    def read(self, member: Member) -> bytes:
        return read_member(self.tar_path, member)

    def column(self, name: str) -> list[Any]:
        if name not in self.table.column_names:
            return [None] * self.table.num_rows
        return self.table.column(name).to_pylist()


def read_member(tar_path: Path, member: Member) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


def index_tar(path: Path) -> dict[str, dict[str, Member]]:
    """key -> extension -> ``Member`` for every regular file of a webdataset tar."""
    index: dict[str, dict[str, Member]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = Path(info.name).name.partition(".")
                index.setdefault(key, {})[ext.lower()] = Member(info.offset_data, info.size)
    except (OSError, tarfile.TarError) as exc:
        raise ShardError(f"cannot read tar {path}: {exc}") from exc
    return index


def read_table(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"cannot read parquet {path}: {exc}") from exc
    missing = {"key", "url", "caption", "status"} - set(table.column_names)
    if missing:
        raise ShardError(f"{path}: missing columns {sorted(missing)}")
    return table


def check_consistent(shard: Shard) -> None:
    """Every ``ok`` row has an image in the tar and the tar has nothing else."""
    ok_keys = {shard.keys[i] for i in shard.ok_rows()}
    with_image = {k for k, parts in shard.members.items()
                  if any(ext in parts for ext in IMAGE_EXTENSIONS)}
    if ok_keys != with_image:
        only_pq = sorted(ok_keys - with_image)[:5]
        only_tar = sorted(with_image - ok_keys)[:5]
        raise ShardError(f"{shard.tar_path}: tar and parquet disagree "
                         f"(ok without image: {only_pq}, image without ok row: {only_tar})")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def localize(url: str, workdir: Path) -> Path:
    """A local path for ``url``: the path itself, or a copy fetched with fsspec."""
    if "://" not in url:
        return Path(url)
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    import fsspec

    target = workdir / Path(url.rstrip("/")).name
    try:
        with fsspec.open(url, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot fetch {url}: {exc}") from exc
    return target


def verify(path: Path, expected_sha256: str) -> None:
    if not path.is_file():
        raise ShardError(f"shard file missing: {path}")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ShardError(f"{path}: sha256 {actual} differs from the lease's {expected_sha256}")


def open_shard(files: ShardFiles, workdir: Path) -> Shard:
    """Fetch (if remote), verify the digests, index the tar, read the parquet, check them."""
    tar_path = localize(files.tar, workdir)
    parquet_path = localize(files.parquet, workdir)
    verify(tar_path, files.tar_sha256)
    verify(parquet_path, files.parquet_sha256)
    shard = Shard(tar_path=tar_path, table=read_table(parquet_path), members=index_tar(tar_path))
    check_consistent(shard)
    return shard


def open_local_shard(tar_path: Path, parquet_path: Path) -> Shard:
    """The same, for files on disk without a lease (``pairfarm postprocess-shard``)."""
    shard = Shard(tar_path=tar_path, table=read_table(parquet_path), members=index_tar(tar_path))
    check_consistent(shard)
    return shard
