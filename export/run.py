"""The export loop: read new batches in order, cut their samples into numbered shards.

Shards are numbered from 0 and keys are ``key_of(shard, row)``. Without
``samples_per_shard`` each source batch with samples becomes one shard; with it, shards
hold that many samples and the last one may be short: it is recorded as the manifest's
``tail`` and rewritten by the next export that has more samples. The manifest is saved
after each complete shard, so a killed export resumes where its manifest says (a shard
written but not yet recorded is written again, under the same name and content).

Resource handling: the open shard is committed or aborted before ``export`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from export import manifest as manifests
from export.errors import LayoutError
from export.files import remove_leftovers
from export.layouts import load_layout
from export.layouts.base import DatasetLayout, Embeddings, Layout, ShardSink
from export.manifest import Manifest
from export.settings import ExportResult, ExportSettings
from export.source import Sample, Source, open_source
from pairfarm.shardformat import key_of

__all__ = ["ExportResult", "ExportSettings", "export"]


@dataclass(frozen=True)
class Plan:
    """What this run reads: the tail to rewrite, then each new batch from ``skip``."""

    tail: list[tuple[int, int]]
    batches: list[tuple[int, int]]  # (batch id, samples of it already exported)
    samples: int  # new samples (the tail's are exported already)


class ShardStream:
    """Cuts a stream of samples into shards; keeps the manifest in step."""

    def __init__(self, layout: Layout, dest: Path, manifest: Manifest) -> None:
        self.layout, self.dest, self.manifest = layout, dest, manifest
        self._sink: ShardSink | None = None
        self._refs: list[tuple[int, int]] = []
        self._batch: tuple[int, int] | None = None  # batch being read, samples taken

    def add(self, sample: Sample) -> None:
        if self._sink is None:
            if not self.manifest.counts and not self.manifest.tail:
                self.layout.check(sample, self.manifest.embeddings)
            self._sink = self.layout.open_shard(self.dest, self.manifest.next_index,
                                                embeddings=self.manifest.embeddings)
        self._sink.add(sample, key_of(self.manifest.next_index, len(self._refs)),
                       len(self._refs))
        self._refs.append((sample.batch_id, sample.row))
        if self._batch is not None:
            self._batch = (self._batch[0], self._batch[1] + 1)
        if len(self._refs) == self.manifest.samples_per_shard:
            self._complete()

    def begin_batch(self, batch_id: int, skip: int) -> None:
        self._batch = (batch_id, skip)

    def end_batch(self) -> None:
        assert self._batch is not None
        self.manifest.batches.append(self._batch[0])
        self._batch = None
        self.manifest.partial = None
        if self.manifest.samples_per_shard is None and self._sink is not None:
            self._complete()

    def finish(self) -> None:
        """Write the short last shard (its samples become the manifest's tail)."""
        if self._sink is not None:
            self._sink.commit()
            self._sink = None
        self.manifest.tail = list(self._refs)
        self.manifest.save(self.dest)

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()
            self._sink = None

    def _complete(self) -> None:
        assert self._sink is not None
        self._sink.commit()
        self._sink = None
        self.manifest.counts.append(len(self._refs))
        self._refs = []
        self.manifest.tail = []
        self.manifest.partial = self._batch
        self.manifest.save(self.dest)


def prepare(layout: Layout, settings: ExportSettings) -> tuple[Source, Manifest]:
    """The source and the manifest (the existing one when options match)."""
    if settings.options:
        raise LayoutError(f"the {layout.name} layout takes no --layout-option")
    source = open_source(settings.source_url)
    if layout.embeddings is Embeddings.REQUIRED and not (
            source.has_embeddings and settings.embeddings):
        raise LayoutError(f"the {layout.name} layout needs embeddings: {source.folder} is a "
                          f"{source.kind} folder without them (export a post-processed "
                          "folder)" if settings.embeddings else
                          f"the {layout.name} layout needs embeddings (no --no-embeddings)")
    wanted = Manifest(layout=layout.name, source_kind=source.kind.value, source=source.folder,
                      samples_per_shard=settings.samples_per_shard,
                      embeddings=settings.embeddings and source.has_embeddings
                      and layout.embeddings is not Embeddings.NONE)
    existing = manifests.load(settings.dest)
    if existing is None:
        return source, wanted
    wanted.check_same(existing, settings.dest)
    existing.source = existing.source or wanted.source  # a manifest from before it was kept
    return source, existing


def plan(source: Source, manifest: Manifest) -> Plan:
    done = set(manifest.batches)
    partial = manifest.partial
    new = [b for b in source.done_batches() if b not in done]
    if partial is not None:
        new = [partial[0], *(b for b in new if b != partial[0])]
    batches = [(b, partial[1] if partial and b == partial[0] else 0) for b in new]
    counts = sum(len(source.selected_rows(b)) - skip for b, skip in batches)
    return Plan(tail=list(manifest.tail), batches=batches, samples=counts)


def _tail_samples(source: Source, tail: list[tuple[int, int]]) -> Iterator[Sample]:
    by_batch: dict[int, set[int]] = {}
    for batch, row in tail:
        by_batch.setdefault(batch, set()).add(row)
    found = {(s.batch_id, s.row): s for b, rows in by_batch.items()
             for s in source.samples(b, rows=rows)}
    missing = [ref for ref in tail if ref not in found]
    if missing:
        raise LayoutError(f"{source.folder} no longer has samples of the last shard: "
                          f"(batch, row) {missing[:3]}")
    yield from (found[ref] for ref in tail)


def export(settings: ExportSettings, advance: Callable[[int], None] | None = None,
           on_total: Callable[[int], None] | None = None) -> ExportResult:
    """Add the source's new batches to the export at ``settings.dest``; ``on_total`` is
    told how many samples this run adds, ``advance`` each one as it is written."""
    layout = load_layout(settings.layout)
    step = advance or (lambda n: None)
    if isinstance(layout, DatasetLayout):
        return layout.export(settings, advance=step, on_total=on_total or (lambda n: None))
    return _export_shards(layout, settings, step, on_total)


def _export_shards(layout: Layout, settings: ExportSettings, step: Callable[[int], None],
                   on_total: Callable[[int], None] | None) -> ExportResult:
    source, manifest = prepare(layout, settings)
    remove_leftovers(settings.dest)
    work = plan(source, manifest)
    if on_total is not None:
        on_total(work.samples)
    stream = ShardStream(layout, settings.dest, manifest)
    try:
        for sample in _tail_samples(source, work.tail):
            stream.add(sample)
        for batch, skip in work.batches:
            stream.begin_batch(batch, skip)
            for sample in source.samples(batch, skip=skip):
                stream.add(sample)
                step(1)
            stream.end_batch()
        stream.finish()
    finally:
        stream.abort()
    return ExportResult(batches=len(work.batches), samples=work.samples,
                        shards=manifest.next_index + (1 if manifest.tail else 0),
                        total=manifest.samples)
