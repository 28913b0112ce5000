"""A batch through the whole pipeline into real shard files, and ``pairfarm download``."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
import trio
from PIL import Image

from pairfarm.protocol import Candidate
from pairfarm.shardformat import PARQUET_COLUMNS, STATS_KEYS, key_of
from tests import hostile_server as hs
from tests.conftest import run_cli
from worker.batch import Network, download_batch
from worker.errors import ShardWriteError
from worker.settings import FetchSettings, ImageSettings, PipelineSettings

JPEGS = [hs.jpeg_bytes(300 + 40 * i, 200 + 30 * i, seed=i) for i in range(6)]
SETTINGS = PipelineSettings(fetch=FetchSettings(deadline=10),
                            image=ImageSettings(image_size=64, resize_mode="keep_ratio"),
                            decode_threads=2)


def _routes() -> dict[str, hs.Handler]:
    routes = {f"/img/{i}.jpg": hs.route_ok(data) for i, data in enumerate(JPEGS)}
    routes["/gone.jpg"] = hs.route_status(410)
    routes["/noai.jpg"] = hs.route_ok(JPEGS[0], headers={"X-Robots-Tag": "noai"})
    routes["/tiny.jpg"] = hs.route_ok(b"\xff\xd8\xff" + b"\0" * 100)
    routes["/bomb.png"] = hs.route_ok(hs.png_bomb_header(), "image/png")
    routes["/page.jpg"] = hs.route_ok(b"<html>" + b" " * 6000 + b"</html>", "text/html")
    return routes


PATHS = ["/img/0.jpg", "/gone.jpg", "/img/1.jpg", "/noai.jpg", "/img/2.jpg", "/tiny.jpg",
         "/img/3.jpg", "/bomb.png", "/img/4.jpg", "/page.jpg", "/img/5.jpg"]
EXPECTED = ["ok", "http_4xx", "ok", "opted_out", "ok", "too_small", "ok", "bomb", "ok",
            "not_image", "ok"]


def _candidates(url_of: object) -> list[Candidate]:
    assert callable(url_of)
    return [Candidate(id=100 + i, url=url_of(path), caption=f"caption {i}",
                      extra={"similarity": i / 10, "source": "test"})
            for i, path in enumerate(PATHS)]


def _check_shard(directory: Path, stem: str, candidates: list[Candidate]) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [f"{stem}.tar", f"{stem}.parquet", f"{stem}_stats.json"])  # no temp file left
    table = pq.read_table(directory / f"{stem}.parquet").to_pylist()
    assert list(table[0])[: len(PARQUET_COLUMNS)] == list(PARQUET_COLUMNS)
    assert [row["key"] for row in table] == [key_of(int(stem), i)
                                             for i in range(len(candidates))]
    assert table[1]["key"] == f"{stem}000001"  # unique across shards: the stem, the row
    assert [row["url"] for row in table] == [c.url for c in candidates]
    assert [row["error_class"] or "ok" for row in table] == EXPECTED
    assert [row["similarity"] for row in table] == [c.extra["similarity"] for c in candidates]
    ok_rows = [row for row in table if row["status"] == "success"]
    with tarfile.open(directory / f"{stem}.tar") as tar:
        names = tar.getnames()
        assert len(names) == 3 * len(ok_rows)
        for row in ok_rows:
            image = Image.open(io.BytesIO(tar.extractfile(f"{row['key']}.jpg").read()))  # type: ignore[union-attr]
            assert image.size == (row["width"], row["height"]) and min(image.size) == 64
            caption = tar.extractfile(f"{row['key']}.txt").read().decode()  # type: ignore[union-attr]
            assert caption == row["caption"]
            meta = json.loads(tar.extractfile(f"{row['key']}.json").read())  # type: ignore[union-attr]
            assert meta["url"] == row["url"] and meta["sha256"] == row["sha256"]
    stats = json.loads((directory / f"{stem}_stats.json").read_text())
    assert set(STATS_KEYS) <= set(stats)
    _check_stats(stats, table)


def _check_stats(stats: dict[str, Any], table: list[dict[str, Any]]) -> None:
    """img2dataset's stats fields, with its meaning, agree with the parquet's rows."""
    statuses = Counter(row["status"] for row in table)
    assert stats["count"] == len(table) == len(EXPECTED)
    assert stats["successes"] == statuses["success"] == EXPECTED.count("ok")
    # img2dataset: the body never arrived whole -> failed_to_download (the 410, the
    # X-Robots-Tag); a whole body its resizer rejects -> failed_to_resize (too small,
    # not an image, the bomb)
    assert stats["failed_to_download"] == statuses["failed_to_download"] == 2
    assert stats["failed_to_resize"] == statuses["failed_to_resize"] == 3
    assert stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] == len(
        table)
    # status_dict: img2dataset's "success", failures by outcome class; sums to count
    failures = Counter(row["error_class"] for row in table if row["error_class"])
    assert stats["status_dict"] == {"success": stats["successes"], **failures}
    assert sum(stats["status_dict"].values()) == stats["count"]
    assert 0 < stats["start_time"] <= stats["end_time"]
    assert stats["duration"] == pytest.approx(stats["end_time"] - stats["start_time"])
    assert stats["bytes_downloaded"] > 0 and "batch_id" in stats  # pairfarm's own, kept


def test_download_batch_writes_a_complete_shard(tmp_path: Path) -> None:
    async def main() -> tuple[object, list[Candidate]]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, _routes())
            candidates = _candidates(server.url)
            prepared = await download_batch(
                7, candidates, settings=SETTINGS, fs=fsspec.filesystem("file"),
                directory=str(tmp_path), network=Network(resolver=dns, dialer=dialer))
            hidden = sorted(p.name for p in await trio.Path(tmp_path).iterdir())
            assert all(name.startswith(".") for name in hidden)  # nothing public yet
            files = await prepared.commit()
            nursery.cancel_scope.cancel()
        return files, candidates

    files, candidates = trio.run(main)
    _check_shard(tmp_path, "00000007", candidates)
    assert files.tar.endswith("00000007.tar")  # type: ignore[attr-defined]


def test_a_cancelled_batch_leaves_no_files(tmp_path: Path) -> None:
    async def main() -> None:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, {"/slow": hs.route_slow_first_byte(5, b"")})
            with trio.move_on_after(0.5):
                await download_batch(1, [Candidate(id=1, url=server.url("/slow"), caption="")],
                                     settings=SETTINGS, fs=fsspec.filesystem("file"),
                                     directory=str(tmp_path),
                                     network=Network(resolver=dns, dialer=dialer))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_storage_is_a_shard_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> None:
        await download_batch(1, [], settings=SETTINGS, fs=fsspec.filesystem("file"),
                             directory=str(blocker / "out"))

    with pytest.raises(ShardWriteError):
        trio.run(main)


def test_download_command_end_to_end(tmp_path: Path) -> None:
    import pyarrow as pa

    with hs.server_thread(_routes()) as server:
        urls = [f"http://127.0.0.1:{server.port}{path}" for path in PATHS]
        candidates = [Candidate(id=i, url=u, caption=f"caption {i}",
                                extra={"similarity": i / 10}) for i, u in enumerate(urls)]
        pq.write_table(pa.table({"url": urls, "caption": [c.caption for c in candidates],
                                 "similarity": [i / 10 for i in range(len(urls))]}),
                       tmp_path / "list.parquet")
        out = tmp_path / "out"
        refused = run_cli("download", str(tmp_path / "list.parquet"), "-o", str(out / "x"),
                          "--no-progress")
        assert f"ssrf_blocked    {len(PATHS)}" in refused.stdout  # the guard is on by default
        done = run_cli("download", str(tmp_path / "list.parquet"), "-o", str(out / "y"),
                       "--image-size", "64", "--resize-mode", "keep_ratio",
                       "--allow-cidr", "127.0.0.0/8", "--shard-size", str(len(PATHS)),
                       "--no-progress")
    assert f"{len(PATHS)} URLs" in done.stdout and "6 ok" in done.stdout
    _check_shard(out / "y", "00000000", candidates)


def test_download_command_reports_bad_input_clearly(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("link,text\nhttp://a.example/x.jpg,hello\n")
    proc = run_cli("download", str(tmp_path / "list.csv"), "-o", str(tmp_path / "o"),
                   check=False)
    assert proc.returncode == 1 and "no column 'url'" in proc.stderr
    proc = run_cli("download", str(tmp_path / "list.csv"), "--allow-cidr", "300.1.1.1/8",
                   check=False)
    assert proc.returncode == 1 and "invalid CIDR" in proc.stderr
