"""Building and growing an index folder from post-processing's embeddings.

``build_index(source, dest, settings)`` reads the shards of ``source`` (``knn.source``)
that ``dest`` does not hold yet, one shard at a time, and:

1. counts their rows (metadata only) and decides, with ``knn.choose``, whether the index
   in ``dest`` can grow (vectors added, nothing retrained) or must be (re)built: a new
   folder, ``--rebuild``, or ``choose.rebuild_reason``;
2. for a new index of a trained type, trains it on a random sample of the rows
   (``min(n, 100 nlist)`` as autofaiss, at most 1 GiB of float32);
3. adds the new shards' unit vectors, writing each shard's metadata rows beside it;
4. measures recall@10 against the exact neighbours (``knn.exact``) of ``eval_queries``
   rows drawn at random from the whole index, leaving each query's own row out of both
   lists, and sets the search parameter (``efSearch`` or ``nprobe``) to the smallest value
   whose recall reaches ``recall_target`` (binary search, as autofaiss's
   ``get_min_param_value_for_best_neighbors_coverage``); when even the largest value
   cannot, the largest is kept and the recall it reaches is recorded;
5. writes the faiss file, then ``index.json`` (``knn.store``).

Progress goes to a ``Progress`` callback: ``(stage, done, total)``.

Error handling: source problems raise ``SourceError``; faiss's ``RuntimeError`` is
converted to ``IndexBuildError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from knn import source, store
from knn.choose import IVF_HNSW_FROM, Choice, choose_index, rebuild_reason
from knn.errors import IndexBuildError, SourceError
from knn.exact import exact_knn, normalise, recall_at

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
RECALL_K = 10
TRAIN_PER_LIST = 100
TRAIN_MAX_BYTES = 2**30
EF_SEARCH_MAX = 4096


@dataclass(frozen=True)
class BuildSettings:
    """What ``pairfarm index`` was asked for."""

    budget: int  # bytes the index may take in memory
    recall_target: float = 0.95
    eval_queries: int = 1000
    keep_untagged: bool = False
    rebuild: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise IndexBuildError(f"recall target {self.recall_target} is not in (0, 1]")
        if self.eval_queries < 1:
            raise IndexBuildError("at least one evaluation query is needed")


@dataclass(frozen=True)
class BuildReport:
    info: store.IndexInfo
    added: int  # vectors added by this run
    rebuilt: str | None  # why the index was (re)built, None when it grew or was current


def _silent(stage: str, done: int, total: int) -> None:
    log.info("%s %d/%d", stage, done, total)


@dataclass(frozen=True)
class Job:
    """One run: where from, where to, what was asked, where progress goes."""

    src: Path
    dest: Path
    settings: BuildSettings
    progress: Progress = _silent


def unit32(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit norm, C-contiguous (what faiss takes)."""
    return np.ascontiguousarray(normalise(vectors, np.float32))


def _entries(src: Path, stems: Sequence[str], keep_untagged: bool) -> list[store.ShardEntry]:
    return [store.ShardEntry(stem, *source.kept_rows(src, stem, keep_untagged=keep_untagged))
            for stem in stems]


def _chunks(src: Path, entries: Sequence[store.ShardEntry],
            keep_untagged: bool) -> Iterator[np.ndarray]:
    for part in source.iter_shards(src, [e.stem for e in entries], keep_untagged=keep_untagged):
        yield part.vectors


def gather(src: Path, entries: Sequence[store.ShardEntry], positions: np.ndarray,
           keep_untagged: bool) -> np.ndarray:
    """Unit float32 vectors at sorted global ``positions`` of the concatenated shards."""
    out, start = [], 0
    for entry in entries:
        mine = positions[(positions >= start) & (positions < start + entry.rows)] - start
        if len(mine):
            part = source.read_shard(src, entry.stem, keep_untagged=keep_untagged)
            out.append(unit32(part.vectors[mine]))
        start += entry.rows
    return np.concatenate(out)


def _faiss_call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError as exc:
        raise IndexBuildError(f"faiss failed to {what}: {exc}") from exc


def new_index(choice: Choice, d: int) -> Any:
    import faiss

    return _faiss_call(f"create {choice.key}",
                       lambda: faiss.index_factory(d, choice.key, faiss.METRIC_L2))


def set_search_param(index: Any, choice: Choice, value: int) -> None:
    """Set ``efSearch`` / ``nprobe`` (and an HNSW coarse quantizer's efSearch, 2 nprobe as
    autofaiss sets it)."""
    import faiss

    if choice.param is None:
        return
    space = faiss.ParameterSpace()
    space.set_index_parameter(index, choice.param, value)
    if choice.kind == "OPQ" and choice.nlist >= IVF_HNSW_FROM:
        space.set_index_parameter(index, "quantizer_efSearch", max(2 * value, 16))


def _train(index: Any, choice: Choice, job: Job, entries: list[store.ShardEntry]) -> int:
    n = sum(e.rows for e in entries)
    if not choice.needs_training:
        return n
    train_n = min(n, TRAIN_PER_LIST * choice.nlist, TRAIN_MAX_BYTES // (4 * index.d))
    rng = np.random.default_rng(job.settings.seed)
    positions = np.sort(rng.choice(n, size=train_n, replace=False))
    sample = gather(job.src, entries, positions, job.settings.keep_untagged)
    log.info("training %s on %d of %d vectors", choice.key, train_n, n)
    _faiss_call(f"train {choice.key}", lambda: index.train(sample))
    return n


def _add(index: Any, job: Job, entries: Sequence[store.ShardEntry]) -> int:
    added = 0
    stems = [e.stem for e in entries]
    parts = source.iter_shards(job.src, stems, keep_untagged=job.settings.keep_untagged)
    for done, part in enumerate(parts, 1):
        if len(part.vectors):
            _faiss_call("add vectors", partial(index.add, unit32(part.vectors)))
        store.write_rows(job.dest, part.stem, part.metadata)
        added += len(part.vectors)
        job.progress("adding shards", done, len(stems))
    return added


def leave_one_out(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than its own (rows hold at least k + 1 ids)."""
    keep = ids != own[:, None]
    return np.stack([row[mask][:k] for row, mask in zip(ids, keep, strict=True)])


@dataclass(frozen=True)
class Evaluation:
    queries: np.ndarray  # unit float32
    own: np.ndarray  # each query's own id
    gold: np.ndarray  # exact top RECALL_K without the query itself


def evaluation_set(src: Path, entries: list[store.ShardEntry],
                   settings: BuildSettings) -> Evaluation | None:
    n = sum(e.rows for e in entries)
    if n <= RECALL_K:
        return None
    rng = np.random.default_rng(settings.seed + 1)
    own = np.sort(rng.choice(n, size=min(settings.eval_queries, n), replace=False))
    queries = gather(src, entries, own, settings.keep_untagged)
    exact = exact_knn(queries, _chunks(src, entries, settings.keep_untagged), RECALL_K + 1)
    return Evaluation(queries, own, leave_one_out(exact.ids, own, RECALL_K))


def measure(index: Any, choice: Choice, value: int, ev: Evaluation) -> tuple[float, float]:
    """(recall@10, queries/s) with the search parameter at ``value``."""
    set_search_param(index, choice, value)
    began = time.perf_counter()
    _, ids = index.search(ev.queries, RECALL_K + 1)
    elapsed = time.perf_counter() - began
    return (recall_at(leave_one_out(ids, ev.own, RECALL_K), ev.gold, RECALL_K),
            len(ev.queries) / max(elapsed, 1e-9))


def param_range(choice: Choice) -> tuple[int, int]:
    if choice.kind == "HNSW":
        return RECALL_K + 1, EF_SEARCH_MAX
    return 1, choice.nlist


def tune(index: Any, choice: Choice, ev: Evaluation, target: float,
         progress: Progress) -> tuple[int | None, float, float]:
    """(smallest parameter value reaching ``target`` or the largest, recall, queries/s)."""
    if choice.param is None:
        return None, *measure(index, choice, 0, ev)
    lo, hi = param_range(choice)
    best = (hi, *measure(index, choice, hi, ev))
    steps = 0
    while lo < best[0] and best[1] >= target:
        mid = (lo + best[0]) // 2
        recall, qps = measure(index, choice, mid, ev)
        steps += 1
        progress(f"tuning {choice.param}", steps, 0)
        if recall >= target:
            best = (mid, recall, qps)
        else:
            lo = mid + 1
    set_search_param(index, choice, best[0])
    return best


def _rebuild_reason(previous: store.IndexInfo | None, n: int, d: int,
                    settings: BuildSettings) -> str | None:
    if previous is None:
        return "new index" if not settings.rebuild else "rebuild asked for"
    if previous.dim != d:
        raise SourceError(f"the source has {d}-d embeddings, the index {previous.dim}-d")
    if previous.keep_untagged != settings.keep_untagged:
        return "the NSFW filter changed (--keep-untagged)"
    return rebuild_reason(previous.choice, previous.trained_n, n, d, settings.budget)


def _open_faiss(dest: Path, info: store.IndexInfo) -> Any:
    import faiss

    return _faiss_call(f"read {dest / info.index_file}",
                       lambda: faiss.read_index(str(dest / info.index_file)))


def _fresh(job: Job, entries: list[store.ShardEntry], d: int) -> tuple[Any, Choice, int, int]:
    n = sum(e.rows for e in entries)
    choice = choose_index(n, d, job.settings.budget)
    log.info("building %s for %d vectors of width %d", choice.key, n, d)
    index = new_index(choice, d)
    trained_n = _train(index, choice, job, entries)
    return index, choice, trained_n, _add(index, job, entries)


def build_index(src: Path, dest: Path, settings: BuildSettings,
                progress: Progress = _silent) -> BuildReport:
    """Build the index in ``dest`` from ``src``, or add the shards it does not hold yet."""
    job = Job(src, dest, settings, progress)
    stems = source.list_shards(src)
    if not stems:
        raise SourceError(f"{src}: no img_emb_*.npy files")
    previous = None if settings.rebuild else store.read_info(dest)
    held = {s.stem for s in previous.shards} if previous else set()
    new = _entries(src, [s for s in stems if s not in held], settings.keep_untagged)
    entries = [*(previous.shards if previous else []), *new]
    n, d = sum(e.rows for e in entries), source.width(src, stems[0])
    if n == 0:
        raise SourceError(f"{src}: no rows left once NSFW rows are removed "
                          f"(--keep-untagged keeps rows without an NSFW score)")
    reason = _rebuild_reason(previous, n, d, settings)
    if previous is not None and reason is None:
        if not new:
            return BuildReport(previous, 0, None)
        index, choice, trained_n = _open_faiss(dest, previous), previous.choice, \
            previous.trained_n
        added = _add(index, job, new)
    else:
        if previous is None and settings.rebuild:
            previous = store.read_info(dest)
        entries = _entries(src, stems, settings.keep_untagged)  # counts under today's filter
        index, choice, trained_n, added = _fresh(job, entries, d)
    info = _finish(index, choice, job, entries, trained_n)
    store.commit(dest, info, previous)
    return BuildReport(info, added, reason)


def _finish(index: Any, choice: Choice, job: Job, entries: list[store.ShardEntry],
            trained_n: int) -> store.IndexInfo:
    src, settings = job.src, job.settings
    ev = evaluation_set(src, entries, settings)
    value, recall, qps = tune(index, choice, ev, settings.recall_target, job.progress) if ev \
        else (param_range(choice)[1] if choice.param else None, None, None)
    if value is not None:
        set_search_param(index, choice, value)
    n = sum(e.rows for e in entries)
    info = store.IndexInfo(
        kind=choice.kind, key=choice.key, m=choice.m, nlist=choice.nlist, out_d=choice.out_d,
        dim=index.d, ntotal=n, trained_n=trained_n, budget=settings.budget,
        index_file=f"knn-{n}.index", source=str(src), param=choice.param, value=value,
        recall_at_10=recall, recall_target=settings.recall_target,
        eval_queries=0 if ev is None else len(ev.queries), queries_per_s=qps,
        keep_untagged=settings.keep_untagged, shards=entries)
    if recall is not None and recall < settings.recall_target:
        log.warning("%s reaches recall@10 %.3f at most (target %.2f): a larger memory "
                    "budget allows a more exact index", choice.key, recall,
                    settings.recall_target)
    store.write_index_file(job.dest, info.index_file, index)
    return info

