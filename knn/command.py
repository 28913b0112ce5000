"""``pairfarm index``: the click command of the knn component.

It reads post-processing's embeddings folder (``knn.source``): a farm's ``--out`` folder,
a post-processing output folder, its ``embeddings/`` folder, or a ``pairfarm export
clip-retrieval`` folder. Errors of the knn component become a one-line ``ClickException``.
(The SISAP export is a layout of ``pairfarm export``: ``knn.sisap_layout``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from knn.errors import KnnError

Progress = Callable[[str, int, int], None]


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    """A rich progress line per stage on stderr (nothing with --no-progress)."""
    from rich.console import Console
    from rich.progress import Progress as Bar

    with Bar(console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield advance


def _require_extra() -> None:
    """faiss and h5py come with the ``knn`` extra; say so instead of a traceback."""
    import importlib.util

    missing = [m for m in ("faiss", "h5py") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"{', '.join(missing)} missing: this command needs the "
                                   f"'knn' extra: pip install 'pairfarm[knn]'")


def _threads(n: int) -> None:
    if n:
        import faiss

        faiss.omp_set_num_threads(n)


@click.command("index")
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--memory", default="4G", show_default=True, envvar="PAIRFARM_INDEX_MEMORY",
              help="Memory budget of the index (e.g. 512M, 16G): picks its type.")
@click.option("--recall-target", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True, envvar="PAIRFARM_INDEX_RECALL_TARGET",
              help="recall@10 the search parameter (efSearch / nprobe) is tuned to reach.")
@click.option("--eval-queries", type=click.IntRange(1), default=1000, show_default=True,
              envvar="PAIRFARM_INDEX_EVAL_QUERIES",
              help="Rows held out while tuning, to measure recall@10 against exact "
                   "search (added afterwards).")
@click.option("--keep-untagged", is_flag=True, envvar="PAIRFARM_INDEX_KEEP_UNTAGGED",
              help="Keep rows without an NSFW score (NSFW rows are always left out).")
@click.option("--rebuild", is_flag=True, help="Build anew instead of adding new shards.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              envvar="PAIRFARM_INDEX_THREADS", help="faiss threads (0: every core).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress on stderr.")
def index_command(source: Path, index_dir: Path, **opts: Any) -> None:
    """Build a kNN index of SOURCE's image embeddings in INDEX_DIR, or add new shards.

    The index type comes from --memory as autofaiss chooses it (Flat, HNSW, IVF, IVF-SQ8,
    OPQ-IVF-PQ; vectors in float16 as the farm writes them); shards already indexed are
    skipped, new ones are added without retraining unless the index outgrew its type
    (then it is rebuilt, and says why). Prints the recall@10 reached against exact
    search on rows held out of the index while it is tuned.
    """
    from knn.build import BuildSettings, build_index
    from knn.choose import parse_memory

    _require_extra()
    try:
        _threads(opts["threads"])
        settings = BuildSettings(
            budget=parse_memory(opts["memory"]), recall_target=opts["recall_target"],
            eval_queries=opts["eval_queries"], keep_untagged=opts["keep_untagged"],
            rebuild=opts["rebuild"])
        with _progress(opts["progress"]) as progress:
            report = build_index(source, index_dir, settings, progress)
    except KnnError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(describe(report))


def describe(report: Any) -> str:
    info = report.info
    how = "rebuilt: " + report.rebuilt if report.rebuilt else "grown"
    if report.added == 0 and report.rebuilt is None:
        how = "up to date"
    line = (f"{info.key}: {info.ntotal:,} vectors of width {info.dim}, {report.added:,} "
            f"added ({how})")
    if info.recall_at_10 is None:
        return line
    param = f"{info.param}={info.value}, " if info.param else ""
    return (f"{line}; {param}recall@10 {info.recall_at_10:.4f} on {info.eval_queries} "
            f"queries (target {info.recall_target}), {info.queries_per_s:,.0f} queries/s")
