"""Building and growing an index folder from post-processing's embeddings.

``build_index(source, dest, settings)`` reads the shards of ``source`` (``knn.source``)
that ``dest`` does not hold yet, one shard at a time, and:

1. counts their rows (metadata only) and decides, with ``knn.choose``, whether the index
   in ``dest`` can grow (vectors added, nothing retrained) or must be (re)built: a new
   folder, ``--rebuild``, or ``choose.rebuild_reason``;
2. for a new index of a trained type, trains it on a random sample of the rows
   (``min(n, 100 nlist)`` as autofaiss, at most 1 GiB of float32);
3. adds the new shards' unit vectors under their row ids, writing each shard's metadata
   rows beside it, but holds back ``eval_queries`` rows drawn at random from the rows it
   adds (at most half of them);
4. measures recall@10 of those held-out rows as queries against their exact neighbours
   among the rows indexed (``knn.exact``): queries the index has not seen, as a user's
   are (a row searched while it is in an HNSW graph finds its neighbours through its own
   links, and measured 0.952 where fresh queries got 0.936); sets the search parameter
   (``efSearch`` or ``nprobe``) to the smallest value whose recall reaches
   ``recall_target`` (binary search, as autofaiss's
   ``get_min_param_value_for_best_neighbors_coverage``; when even the largest value cannot,
   the largest is kept and the recall it reaches is recorded); then adds the held-out rows;
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
                       lambda: faiss.index_factory(d, choice.factory, faiss.METRIC_L2))


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
    if index.is_trained:
        return n
    # float16 storage alone (HNSW) trains on nothing it needs: a small sample does
    lists = choice.nlist if choice.needs_training else 10
    train_n = min(n, TRAIN_PER_LIST * lists, TRAIN_MAX_BYTES // (4 * index.d))
    rng = np.random.default_rng(job.settings.seed)
    positions = np.sort(rng.choice(n, size=train_n, replace=False))
    sample = gather(job.src, entries, positions, job.settings.keep_untagged)
    log.info("training %s on %d of %d vectors", choice.key, train_n, n)
    _faiss_call(f"train {choice.key}", lambda: index.train(sample))
    return n


def _holdout(job: Job, first_id: int, new_rows: int) -> np.ndarray:
    """Sorted global ids of the evaluation queries, drawn from the rows this run adds."""
    if new_rows <= RECALL_K:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(job.settings.seed + 1 + first_id)
    size = min(job.settings.eval_queries, new_rows // 2)
    return first_id + np.sort(rng.choice(new_rows, size=size, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class Added:
    rows: int  # vectors added, the held-out ones included
    held_out: np.ndarray  # their unit float32 vectors, in id order


def _add(index: Any, job: Job, entries: Sequence[store.ShardEntry], first_id: int,
         holdout: np.ndarray) -> Added:
    """Add the shards' vectors with their global ids, except ``holdout``'s (returned)."""
    added, start, held = 0, first_id, []
    stems = [e.stem for e in entries]
    parts = source.iter_shards(job.src, stems, keep_untagged=job.settings.keep_untagged)
    for done, part in enumerate(parts, 1):
        ids = np.arange(start, start + len(part.vectors), dtype=np.int64)
        out = np.isin(ids, holdout)
        vectors = unit32(part.vectors)
        if (~out).any():
            _faiss_call("add vectors", partial(index.add_with_ids, vectors[~out], ids[~out]))
        held.append(vectors[out])
        store.write_rows(job.dest, part.stem, part.metadata)
        added += len(ids)
        start += len(ids)
        job.progress("adding shards", done, len(stems))
    width = int(index.d)
    return Added(added, np.concatenate(held) if held else np.empty((0, width), np.float32))


@dataclass(frozen=True)
class Evaluation:
    ids: np.ndarray  # the held-out rows' ids
    queries: np.ndarray  # their unit float32 vectors
    gold: np.ndarray  # exact top RECALL_K over the index without the held-out rows


def evaluation_set(job: Job, entries: list[store.ShardEntry], holdout: np.ndarray,
                   queries: np.ndarray) -> Evaluation | None:
    if len(holdout) == 0:
        return None
    exact = exact_knn(queries, _chunks(job.src, entries, job.settings.keep_untagged),
                      RECALL_K, exclude=holdout)
    return Evaluation(holdout, queries, exact.ids)


def measure(index: Any, choice: Choice, value: int, ev: Evaluation) -> tuple[float, float]:
    """(recall@10, queries/s) of the held-out queries with the search parameter at ``value``."""
    set_search_param(index, choice, value)
    began = time.perf_counter()
    _, ids = index.search(ev.queries, RECALL_K)
    elapsed = time.perf_counter() - began
    return recall_at(ids, ev.gold, RECALL_K), len(ev.queries) / max(elapsed, 1e-9)


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


def _fresh(job: Job, entries: list[store.ShardEntry], d: int) -> tuple[Any, Choice, int]:
    n = sum(e.rows for e in entries)
    choice = choose_index(n, d, job.settings.budget)
    log.info("building %s for %d vectors of width %d", choice.key, n, d)
    index = new_index(choice, d)
    return index, choice, _train(index, choice, job, entries)


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
        to_add, first_id = new, previous.ntotal
    else:
        if previous is None and settings.rebuild:
            previous = store.read_info(dest)
        entries = _entries(src, stems, settings.keep_untagged)  # counts under today's filter
        index, choice, trained_n = _fresh(job, entries, d)
        to_add, first_id = entries, 0
    holdout = _holdout(job, first_id, sum(e.rows for e in to_add))
    added = _add(index, job, to_add, first_id, holdout)
    info = _finish(index, choice, job, entries, trained_n=trained_n,
                   held=(holdout, added.held_out), previous=None if reason else previous)
    store.commit(dest, info, previous)
    return BuildReport(info, added.rows, reason)


def _untuned(choice: Choice, previous: store.IndexInfo | None) -> tuple[Any, Any, Any]:
    """Too few new rows to hold any out: keep what the index had, else the safest value."""
    if previous is not None:
        return previous.value, previous.recall_at_10, previous.queries_per_s
    return (param_range(choice)[1] if choice.param else None), None, None


def _finish(index: Any, choice: Choice, job: Job, entries: list[store.ShardEntry], *,
            trained_n: int, held: tuple[np.ndarray, np.ndarray],
            previous: store.IndexInfo | None) -> store.IndexInfo:
    """Tune on the held-out rows, add them, write the faiss file; the info to commit."""
    src, settings = job.src, job.settings
    ev = evaluation_set(job, entries, *held)
    value, recall, qps = tune(index, choice, ev, settings.recall_target, job.progress) if ev \
        else _untuned(choice, previous)
    if len(held[0]):
        _faiss_call("add vectors", partial(index.add_with_ids, held[1], held[0]))
    if value is not None:
        set_search_param(index, choice, value)
    n = sum(e.rows for e in entries)
    info = store.IndexInfo(
        kind=choice.kind, key=choice.key, m=choice.m, nlist=choice.nlist, out_d=choice.out_d,
        dim=index.d, ntotal=n, trained_n=trained_n, budget=settings.budget,
        index_file=f"knn-{n}.index", source=str(src), param=choice.param, value=value,
        recall_at_10=recall, recall_target=settings.recall_target,
        eval_queries=len(ev.queries) if ev else previous.eval_queries if previous else 0,
        queries_per_s=qps,
        keep_untagged=settings.keep_untagged, shards=entries)
    if recall is not None and recall < settings.recall_target:
        log.warning("%s reaches recall@10 %.3f at most (target %.2f): a larger memory "
                    "budget allows a more exact index", choice.key, recall,
                    settings.recall_target)
    store.write_index_file(job.dest, info.index_file, index)
    return info

