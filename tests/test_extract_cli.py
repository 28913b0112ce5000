"""``pairfarm extract`` end to end: the CLI in a subprocess on WAT files made here."""

from __future__ import annotations

import functools
import gzip
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from extract.watbuild import Img, WatBuilder, WatPage, write_wat
from pairfarm.cli import COMMANDS
from tests.conftest import run_cli

SMALL_BLOOM = ("--bloom-capacity", "100000", "--workers", "2")


def english_pages(prefix: str, n: int) -> list[WatPage]:
    return [WatPage(f"https://{prefix}.example.com/p{i}.html", [
        Img(f"img/{i}.jpg", f"A photo of a garden in summer number {i}"),
        Img(f"data:image/png;base64,{i}", "An inline image that is dropped"),
        Img("/logo.png", "logo"),
    ]) for i in range(n)]


def summary_of(out: Path) -> dict[str, object]:
    [path] = sorted(out.glob("*_summary.json"), key=lambda p: p.stat().st_mtime_ns)[-1:]
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def rows_of(out: Path, run_id: str) -> list[dict[str, object]]:
    return [row for shard in sorted(out.glob(f"{run_id}-*.parquet"))
            for row in pq.read_table(shard).to_pylist()]


@pytest.fixture
def wat_files(tmp_path: Path) -> list[Path]:
    first = write_wat(tmp_path / "a.wat.gz", english_pages("a", 30))
    second = tmp_path / "b.wat.gz"
    with WatBuilder(second) as wat:
        for page in english_pages("b", 10):
            wat.page(page)
        wat.raw_record("https://b.example.com/broken", b"not json at all")
        wat.page(WatPage("https://b.example.de/", [
            Img("haus.jpg", "Ein altes Haus mit rotem Dach im Sommer"),
            Img("https://a.example.com/img/0.jpg",  # the same as a.wat.gz's first: a duplicate
                "A photo of a garden in summer number 0"),
        ], base_href="https://cdn.example.de/bilder/"))
    return [first, second]


def test_extract_writes_shards_and_a_summary(tmp_path: Path, wat_files: list[Path]) -> None:
    out = tmp_path / "out"
    proc = run_cli("extract", *map(str, wat_files), "--out", str(out), "--shard-rows", "25",
                   *SMALL_BLOOM)
    assert "kept" in proc.stderr

    summary = summary_of(out)
    assert summary["files"] == 2 and summary["files_failed"] == 0
    assert summary["pages"] == 41
    assert summary["corrupt_records"] == 1
    assert summary["images"] == 30 * 3 + 10 * 3 + 2
    assert summary["kept"] == 30 + 10 + 1
    assert summary["dropped"] == {"not_http": 40, "short_alt": 40, "dup_in_run": 1}
    assert summary["languages"] == {"en": 40, "de": 1}
    assert summary["shards"] == [f"{summary['run_id']}-00000.parquet",
                                 f"{summary['run_id']}-00001.parquet"]
    assert summary["bloom"]["added_this_run"] == 41  # type: ignore[index]

    rows = rows_of(out, str(summary["run_id"]))
    assert [r["url"] for r in rows][:2] == ["https://a.example.com/img/0.jpg",
                                           "https://a.example.com/img/1.jpg"]
    assert rows[-1] == {
        "url": "https://cdn.example.de/bilder/haus.jpg",
        "caption": "Ein altes Haus mit rotem Dach im Sommer",
        "page_url": "https://b.example.de/",
        "language": "de",
        "language_score": pytest.approx(rows[-1]["language_score"]),
        "source": str(wat_files[1]),
    }
    assert not list(out.glob("*.tmp"))


def test_a_second_run_drops_what_the_first_kept(tmp_path: Path, wat_files: list[Path]) -> None:
    out = tmp_path / "out"
    run_cli("extract", str(wat_files[0]), "--out", str(out), *SMALL_BLOOM)
    run_cli("extract", *map(str, wat_files), "--out", str(out), *SMALL_BLOOM)

    second = summary_of(out)
    assert second["bloom"]["loaded_existing"] is True  # type: ignore[index]
    assert second["dropped"]["dup_earlier_run"] == 30  # type: ignore[index]
    assert second["kept"] == 11
    assert len(list(out.glob("*_summary.json"))) == 2


def test_no_bloom_dedups_within_the_run_only(tmp_path: Path, wat_files: list[Path]) -> None:
    out = tmp_path / "out"
    for _ in range(2):
        run_cli("extract", *map(str, wat_files), "--out", str(out), "--no-bloom")
    runs = sorted(out.glob("*_summary.json"))
    kept = [json.loads(p.read_text())["kept"] for p in runs]
    assert kept == [41, 41]
    assert not (out / "dedup.bloom").exists()
    first, second = (json.loads(p.read_text())["run_id"] for p in runs)
    assert rows_of(out, first) == rows_of(out, second)  # same inputs, same rows, same order


def test_bad_files_are_reported_and_the_rest_extracted(tmp_path: Path,
                                                       wat_files: list[Path]) -> None:
    whole = wat_files[0].read_bytes()
    cut = tmp_path / "cut.wat.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    junk = tmp_path / "junk.wat.gz"
    junk.write_bytes(gzip.compress(b"<html>not a WARC</html>"))
    out = tmp_path / "out"

    proc = run_cli("extract", str(cut), str(junk), str(tmp_path / "missing.wat.gz"),
                   str(wat_files[1]), "--out", str(out), *SMALL_BLOOM, check=False)

    assert proc.returncode == 1
    assert "3 file(s) and 0 ingest(s) failed" in proc.stderr
    summary = summary_of(out)
    errors = {Path(str(f["source"])).name: f["error"] for f in summary["failures"]}  # type: ignore[attr-defined]
    assert set(errors) == {"cut.wat.gz", "junk.wat.gz", "missing.wat.gz"}
    assert "ends" in errors["cut.wat.gz"]
    assert errors["missing.wat.gz"] == "no such file"
    assert summary["files"] == 4
    assert 11 < int(summary["kept"]) < 41  # half of a.wat.gz, all of b.wat.gz  # type: ignore[call-overload]

    failed = out / f"{summary['run_id']}_failed.txt"
    assert failed.read_text().splitlines() == [str(cut), str(junk),
                                               str(tmp_path / "missing.wat.gz")]
    cut.write_bytes(whole)  # the download completed this time
    failed.write_text(f"{cut}\n")
    run_cli("extract", "--from-list", str(failed), "--out", str(out), *SMALL_BLOOM)
    rerun = summary_of(out)
    assert rerun["kept"] == 30 - (int(summary["kept"]) - 11)  # type: ignore[call-overload]
    assert rerun["dropped"]["dup_earlier_run"] == int(summary["kept"]) - 11  # type: ignore[index, call-overload]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_urls_are_streamed_and_http_errors_reported(tmp_path: Path,
                                                    http_root: tuple[str, Path]) -> None:
    base, root = http_root
    write_wat(root / "crawl.wat.gz", english_pages("u", 12))
    listing = tmp_path / "wat.paths.gz"
    with gzip.open(listing, "wt") as f:
        f.write(f"{base}/crawl.wat.gz\n# a comment\n\n{base}/absent.wat.gz\n")
    out = tmp_path / "out"

    proc = run_cli("extract", "--from-list", str(listing), "--out", str(out), "--no-bloom",
                   check=False)

    assert proc.returncode == 1
    summary = summary_of(out)
    assert summary["kept"] == 12
    assert summary["failures"] == [{"source": f"{base}/absent.wat.gz", "error": "HTTP 404"}]


def test_invalid_settings_are_clear_errors(tmp_path: Path, wat_files: list[Path]) -> None:
    proc = run_cli("extract", str(wat_files[0]), "--out", str(tmp_path / "o"),
                   "--bloom-fpr", "1.5", check=False)
    assert proc.returncode == 1
    assert "--bloom-fpr must be in (0, 1)" in proc.stderr
    proc = run_cli("extract", "--out", str(tmp_path / "o"), check=False)
    assert "give at least one WAT file or URL" in proc.stderr


def test_a_bloom_filter_of_the_other_key_is_refused(tmp_path: Path,
                                                    wat_files: list[Path]) -> None:
    out = tmp_path / "out"
    run_cli("extract", str(wat_files[0]), "--out", str(out), *SMALL_BLOOM)
    proc = run_cli("extract", str(wat_files[0]), "--out", str(out), "--dedup-key", "url",
                   *SMALL_BLOOM, check=False)
    assert proc.returncode == 1
    assert "holds 'url+alt' keys" in proc.stderr


@pytest.mark.skipif("ingest" not in COMMANDS, reason="pairfarm ingest is not on this branch")
def test_ingest_streams_each_shard_into_the_database(tmp_path: Path, wat_files: list[Path],
                                                     db_url: str) -> None:
    import psycopg

    from tests.conftest import cli_env

    out = tmp_path / "out"
    run_cli("extract", *map(str, wat_files), "--out", str(out), "--shard-rows", "25",
            "--ingest", *SMALL_BLOOM, env=cli_env(DATABASE_URL=db_url))

    summary = summary_of(out)
    assert summary["ingested"] is True and summary["ingest_failures"] == []
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            "SELECT c.url, c.caption, c.language, c.extra->>'page_url', i.source "
            "FROM candidates c JOIN ingests i ON i.id = c.ingest_id ORDER BY c.id").fetchall()
    assert len(rows) == summary["kept"] == 41
    assert {Path(r[4]).name for r in rows} == set(summary["shards"])  # type: ignore[arg-type]
    assert rows[-1][:4] == ("https://cdn.example.de/bilder/haus.jpg",
                            "Ein altes Haus mit rotem Dach im Sommer", "de",
                            "https://b.example.de/")


@pytest.mark.skipif("ingest" not in COMMANDS, reason="pairfarm ingest is not on this branch")
def test_a_failed_ingest_keeps_the_shard_and_fails_the_run(tmp_path: Path,
                                                           wat_files: list[Path]) -> None:
    out = tmp_path / "out"
    proc = run_cli("extract", str(wat_files[0]), "--out", str(out), "--ingest",
                   "--ingest-arg=--database-url=postgresql+psycopg://nobody@127.0.0.1:1/none",
                   *SMALL_BLOOM, check=False)
    assert proc.returncode == 1
    assert "0 file(s) and 1 ingest(s) failed" in proc.stderr
    summary = summary_of(out)
    [failure] = summary["ingest_failures"]  # type: ignore[misc]
    assert failure.startswith(f"pairfarm ingest {summary['run_id']}-00000.parquet exited")
    assert pq.read_table(out / f"{summary['run_id']}-00000.parquet").num_rows == 30
