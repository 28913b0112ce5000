"""The runner in this process: input order across many files, per-file failures."""

from __future__ import annotations

import io
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from extract.fileworker import FileResult
from extract.runner import _result_of, run_extract
from extract.settings import build_settings
from extract.watbuild import Img, WatPage, write_wat


def settings_for(sources: list[str], out: Path, **change: object):  # type: ignore[no-untyped-def]
    flags = dict(sources=sources, out_dir=out, workers=1, rows_per_shard=1000,
                 min_alt_chars=5, language_threshold=0.5, dedup_key="url+alt",
                 bloom_path=None, use_bloom=True, bloom_capacity=10_000, bloom_fpr=0.01,
                 ingest=False)
    return build_settings(**{**flags, **change})  # type: ignore[arg-type]


def test_rows_follow_input_order_past_the_in_flight_window(tmp_path: Path) -> None:
    # 7 files, 1 worker: 2 in flight, the rest submitted as results are taken
    sources = []
    for f in range(7):
        pages = [WatPage(f"https://f{f}.example.com/", [
            Img(f"{i}.jpg", f"Photo number {i} of file {f}") for i in range(5)])]
        sources.append(str(write_wat(tmp_path / f"{f}.wat.gz", pages)))
    out = tmp_path / "out"

    run = run_extract(settings_for(sources, out), Console(file=io.StringIO()))

    assert run.ok and run.counts.files == 7 and run.counts.kept == 35
    [shard] = run.shards
    urls = pq.read_table(shard)["url"].to_pylist()
    assert urls == [f"https://f{f}.example.com/{i}.jpg" for f in range(7) for i in range(5)]
    assert run.summary_path.exists()
    assert (out / "dedup.bloom").exists()


def test_the_same_candidate_in_two_files_is_kept_from_the_first(tmp_path: Path) -> None:
    page = WatPage("https://e.com/", [Img("https://img.e.com/1.jpg", "The same photo again")])
    a = write_wat(tmp_path / "a.wat.gz", [page])
    b = write_wat(tmp_path / "b.wat.gz", [page])
    run = run_extract(settings_for([str(b), str(a)], tmp_path / "out", use_bloom=False),
                      Console(file=io.StringIO()))
    assert run.counts.kept == 1 and run.counts.dropped == {"dup_in_run": 1}
    assert pq.read_table(run.shards[0])["source"].to_pylist() == [str(b)]


def test_a_dead_worker_fails_its_file_only() -> None:
    future: Future[FileResult] = Future()
    future.set_exception(BrokenProcessPool("killed"))
    result = _result_of("x.wat.gz", future)
    assert result.error is not None and "worker process died" in result.error
    assert result.table.num_rows == 0 and result.keys == []


def test_an_unexpected_error_fails_its_file_only() -> None:
    future: Future[FileResult] = Future()
    future.set_exception(RuntimeError("a bug"))
    result = _result_of("y.wat.gz", future)
    assert result.error == "unexpected RuntimeError: a bug"
