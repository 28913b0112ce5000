"""What a layout is: a writer of numbered output shards (``Layout``), or a writer of a
whole dataset folder (``DatasetLayout``).

``export.run`` opens shard ``index`` (numbered from 0, consecutive), adds its samples
with their export key (``pairfarm.shardformat.key_of(index, row)``) and row, then
commits it: the layout writes every file of the shard under a temporary name and renames
them in ``commit`` (``export.files.Staged``), or removes them in ``abort``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from export.settings import ExportResult, ExportSettings
from export.source import Sample


class Embeddings(StrEnum):
    """What a layout does with the source's embeddings."""

    NONE = "none"  # never writes them
    OPTIONAL = "optional"  # writes them when the source has them
    REQUIRED = "required"  # cannot be written without them


class ShardSink(Protocol):
    def add(self, sample: Sample, key: str, row: int) -> None: ...

    def commit(self) -> list[Path]: ...

    def abort(self) -> None: ...


@runtime_checkable
class Layout(Protocol):
    name: str
    embeddings: Embeddings

    def check(self, sample: Sample, embeddings: bool) -> None:
        """Raise ``LayoutError`` when the layout cannot hold this (first) sample."""

    def open_shard(self, dest: Path, index: int, *, embeddings: bool) -> ShardSink: ...


@runtime_checkable
class DatasetLayout(Protocol):
    """A layout that writes the whole folder in one call (its own files, manifest and
    increments), reading ``settings.source`` with ``export.source`` and taking its own
    ``settings.options``; ``on_total`` gets the samples it will add, ``advance`` each
    one. Errors are ``ExportError``s."""

    name: str

    def export(self, settings: ExportSettings, *, advance: Callable[[int], None],
               on_total: Callable[[int], None]) -> ExportResult: ...
