"""What an export is asked to do and what it did (shared by ``run`` and the layouts)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from export.errors import LayoutError
from pairfarm.shardformat import MAX_SHARD_ROWS


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    layout: str
    #: the farm folder: a local path or an fsspec URL (``s3://bucket/farm``)
    source_url: str | Path
    #: a local folder (the staged renames that make a killed export safe are local ones)
    dest: Path
    samples_per_shard: int | None = None
    embeddings: bool = True
    #: ``--layout-option KEY=VALUE``: for layouts that take options of their own
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples_per_shard is not None and not \
                0 < self.samples_per_shard <= MAX_SHARD_ROWS:
            raise LayoutError(f"--samples-per-shard must be in 1..{MAX_SHARD_ROWS}")

    @property
    def source(self) -> Path:
        """The source as a local folder, for layouts that read it themselves."""
        if is_url(str(self.source_url)):
            raise LayoutError(f"the {self.layout} layout reads a local SOURCE folder, not "
                              f"{self.source_url} (copy it here first)")
        return Path(self.source_url)


def is_url(location: str) -> bool:
    """An fsspec URL other than ``file://`` (``s3://...``, ``gs://...``)."""
    protocol, sep, _ = location.partition("://")
    return bool(sep) and protocol != "file"


@dataclass(frozen=True)
class ExportResult:
    batches: int  # batches added by this run
    samples: int  # samples added by this run
    shards: int  # shards in the export
    total: int  # samples in the export
