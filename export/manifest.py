"""What an export folder holds: ``pairfarm-export.json``, rewritten (temporary name, then
rename) each time a shard is complete, so that it never names a shard that is not there.

``batches``: the source batches whose samples are all in complete shards or in ``tail``.
``counts``: samples per complete shard, shard ``i`` at ``counts[i]``. ``partial``: the
batch being read when the last shard was completed and how many of its samples were
taken. ``tail``: with ``--samples-per-shard``, the samples (batch, parquet row) of the last
shard when it is not full: that shard is rewritten when more samples come. ``source``:
the shard folder exported (batch ids mean something only within one farm, so another
source is refused).

Error handling: an unreadable manifest, or one written with another source, layout,
source kind or shard size, raises ``ManifestError``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ManifestError
from pairfarm.staging import replacing

NAME = "pairfarm-export.json"
VERSION = 1


@dataclass
class Manifest:
    layout: str
    source_kind: str
    samples_per_shard: int | None
    embeddings: bool
    #: the source's shard folder (``Source.folder``: absolute path or URL); None in a
    #: manifest written before it was recorded
    source: str | None = None
    batches: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    partial: tuple[int, int] | None = None
    tail: list[tuple[int, int]] = field(default_factory=list)

    @property
    def next_index(self) -> int:
        """The first shard index that is not complete."""
        return len(self.counts)

    @property
    def samples(self) -> int:
        return sum(self.counts) + len(self.tail)

    def options(self) -> dict[str, Any]:
        return {"layout": self.layout, "source_kind": self.source_kind,
                "samples_per_shard": self.samples_per_shard, "embeddings": self.embeddings}

    def check_same(self, other: Manifest, dest: Path) -> None:
        """Refuse to add to an export made with other options."""
        mine, theirs = self.options(), other.options()
        if mine != theirs:
            diff = ", ".join(f"{k} {theirs[k]!r} (asked: {mine[k]!r})"
                             for k in mine if mine[k] != theirs[k])
            raise ManifestError(f"{dest} holds an export with {diff}; export to another "
                                "folder or repeat the same options")
        if None not in (self.source, other.source) and self.source != other.source:
            raise ManifestError(f"{dest} holds an export of {other.source}, not "
                                f"{self.source}: its batch ids would be taken for those "
                                "already exported; export to another folder")

    def save(self, dest: Path) -> None:
        path = dest / NAME
        data = {"version": VERSION, **asdict(self)}
        try:
            with replacing(path) as tmp:
                tmp.write_text(json.dumps(data, indent=1))
        except OSError as exc:
            raise ManifestError(f"cannot write {path}: {exc}") from exc


def load(dest: Path) -> Manifest | None:
    """The manifest in ``dest``; None when there is none (a new export)."""
    path = dest / NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.pop("version") != VERSION:
            raise ValueError("unknown version")
        partial = data.pop("partial")
        tail = [(int(b), int(r)) for b, r in data.pop("tail")]
        return Manifest(**data, partial=None if partial is None else (partial[0], partial[1]),
                        tail=tail)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
