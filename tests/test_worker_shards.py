"""A batch through the whole pipeline into real shard files, and ``pairfarm download``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

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
    return routes


PATHS = ["/img/0.jpg", "/gone.jpg", "/img/1.jpg", "/noai.jpg", "/img/2.jpg", "/tiny.jpg",
         "/img/3.jpg", "/bomb.png", "/img/4.jpg", "/img/5.jpg"]
EXPECTED = ["ok", "http_4xx", "ok", "opted_out", "ok", "too_small", "ok", "bomb", "ok", "ok"]


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
    assert [row["key"] for row in table] == [key_of(i) for i in range(len(candidates))]
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
    assert stats["count"] == len(candidates) and stats["successes"] == EXPECTED.count("ok")
    assert stats["failed_to_resize"] == 1  # the bomb
    assert stats["failed_to_download"] == 3
    assert sum(stats["status_dict"].values()) == len(candidates)


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
        assert "ssrf_blocked    10" in refused.stdout  # the guard is on by default
        done = run_cli("download", str(tmp_path / "list.parquet"), "-o", str(out / "y"),
                       "--image-size", "64", "--resize-mode", "keep_ratio",
                       "--allow-cidr", "127.0.0.0/8", "--shard-size", "10", "--no-progress")
    assert "10 URLs" in done.stdout and "6 ok" in done.stdout
    _check_shard(out / "y", "00000000", candidates)


def test_download_command_reports_bad_input_clearly(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("link,text\nhttp://a.example/x.jpg,hello\n")
    proc = run_cli("download", str(tmp_path / "list.csv"), "-o", str(tmp_path / "o"),
                   check=False)
    assert proc.returncode == 1 and "no column 'url'" in proc.stderr
    proc = run_cli("download", str(tmp_path / "list.csv"), "--allow-cidr", "300.1.1.1/8",
                   check=False)
    assert proc.returncode == 1 and "invalid CIDR" in proc.stderr
