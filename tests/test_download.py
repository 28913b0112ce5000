"""``pairfarm download`` at img2dataset's level: inputs, resume, processes, layouts,
encode formats, ``skip_reencode`` and face-box blurring."""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trio
from PIL import Image, ImageChops, ImageFilter

from tests import hostile_server as hs
from tests.conftest import REPO, cli_env, run_cli
from worker.blur import blur_boxes, grown_box, parse_boxes
from worker.errors import SettingsError
from worker.imaging import RowInput, process_image
from worker.inputs import Columns, input_files, shards_of_files
from worker.settings import ImageSettings

ROWS = [(f"http://a.example/{i}.jpg", f"caption {i}") for i in range(5)]
BODIES = [hs.jpeg_bytes(220 + 7 * i, 160 + 5 * i, seed=i) for i in range(24)]


# -- inputs ---------------------------------------------------------------------------


def _write(path: Path, fmt: str) -> None:
    base = fmt.removesuffix(".gz")
    if base == "txt":
        data = "".join(f"{url}\n" for url, _ in ROWS).encode()
    elif base in ("csv", "tsv"):
        sep = "\t" if base == "tsv" else ","
        data = ("url" + sep + "caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in ROWS)).encode()
    elif base == "json":
        data = json.dumps([{"url": u, "caption": c} for u, c in ROWS]).encode()
    elif base == "jsonl":
        data = "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in ROWS).encode()
    else:
        out = io.BytesIO()
        pq.write_table(pa.table({"url": [u for u, _ in ROWS], "caption": [c for _, c in ROWS]}),
                       out)
        data = out.getvalue()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)


@pytest.mark.parametrize("fmt", [f"{b}{gz}" for b in ("txt", "csv", "tsv", "json", "jsonl",
                                                      "parquet") for gz in ("", ".gz")])
def test_every_input_format_with_and_without_gzip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"list.{fmt}"
    _write(path, fmt)
    files = input_files([str(path)], None)
    assert [f.input_format for f in files] == [fmt]  # told by the name
    shards = list(shards_of_files(files, Columns(), 2))
    assert [s.number for s in shards] == [0, 1, 2]
    got = [(c.url, c.caption) for s in shards for c in s.candidates]
    want_captions = fmt.startswith("txt")
    assert got == [(u, "" if want_captions else c) for u, c in ROWS]
    assert [c.id for s in shards for c in s.candidates] == list(range(len(ROWS)))


def test_json_of_columns_and_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"url": [u for u, _ in ROWS], "caption": [c for _, c in ROWS]}))
    shards = list(shards_of_files(input_files([str(path)], None), Columns(), 10))
    assert [(c.url, c.caption) for c in shards[0].candidates] == ROWS
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SettingsError, match=r"bad\.csv\.gz"):
        list(shards_of_files(input_files([str(tmp_path / "bad.csv.gz")], None), Columns(), 10))


def test_folders_and_globs_in_sorted_order_numbered_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    for name, fmt in (("b.csv.gz", "csv.gz"), ("a.jsonl", "jsonl"), ("c.parquet", "parquet")):
        _write(folder / name, fmt)
    (folder / ".hidden.csv").write_text("url\nhttp://hidden.example/x.jpg\n")
    (folder / "notes.md").write_text("not a list")
    from_folder = input_files([str(folder)], None)
    assert [Path(f.path).name for f in from_folder] == ["a.jsonl", "b.csv.gz", "c.parquet"]
    from_glob = input_files([str(folder / "*.c*")], None)
    assert [Path(f.path).name for f in from_glob] == ["b.csv.gz"]
    shards = list(shards_of_files(from_folder, Columns(), 2))
    # each file cut on its own (img2dataset): 5 rows -> 3 shards per file, numbered on
    assert [s.number for s in shards] == list(range(9))
    assert [len(s.candidates) for s in shards] == [2, 2, 1] * 3
    assert [c.id for s in shards for c in s.candidates] == list(range(15))
    only_csv = input_files([str(folder)], "csv.gz")
    assert [Path(f.path).name for f in only_csv] == ["b.csv.gz"]
    with pytest.raises(SettingsError, match="no input file"):
        input_files([str(folder / "*.tsv")], None)


def test_bad_box_cells_are_refused_naming_the_row(tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text('url,faces\nhttp://a.example/1.jpg,"[[0.1,0.1,0.2,0.2]]"\n'
                       'http://a.example/2.jpg,"[[0.5,0.5,1.5,0.6]]"\n')
    proc = run_cli("download", str(listing), "-o", str(tmp_path / "o"), "--bbox-col", "faces",
                   "--caption-col", "", check=False)
    assert proc.returncode == 1
    assert "row 2, column 'faces'" in proc.stderr and "0 <= x0 <= x1 <= 1" in proc.stderr
    assert not list((tmp_path / "o").glob("*.parquet"))


# -- a server the download runs against -------------------------------------------------


class Gate:
    """Holds the answers to the URLs from ``first`` on until ``open`` is called."""

    def __init__(self, first: int) -> None:
        self.first = first
        self._open = threading.Event()
        self.waiting = 0

    def open(self) -> None:
        self._open.set()

    def route(self, n: int) -> hs.Handler:
        async def handler(stream: trio.SocketStream, request: hs.Request) -> None:
            if n >= self.first:
                self.waiting += 1
                await trio.to_thread.run_sync(self._open.wait, abandon_on_cancel=True)
            await hs.respond(stream, 200, BODIES[n], {"Content-Type": "image/jpeg"})
        return handler


def _listing(tmp_path: Path, port: int, count: int, **extra: list[object]) -> Path:
    urls = [f"http://127.0.0.1:{port}/{n}.jpg" for n in range(count)]
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {n}" for n in range(count)],
                             **extra}), path)
    return path


def _download_args(listing: Path, out: Path, *extra: str) -> list[str]:
    return ["download", str(listing), "-o", str(out), "--allow-cidr", "127.0.0.0/8",
            "--no-progress", "--image-size", "64", "--resize-mode", "keep_ratio",
            "--decode-threads", "1", *extra]


def _rows(out: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for path in sorted(out.glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- resume ---------------------------------------------------------------------------


def test_a_rerun_after_kill_9_skips_done_shards_and_redoes_the_rest(tmp_path: Path) -> None:
    count, size = 24, 4
    gate = Gate(first=3 * size)  # shards 0-2 finish, shard 3 hangs until the rerun
    routes = {f"/{n}.jpg": gate.route(n) for n in range(count)}
    out = tmp_path / "out"
    with hs.server_thread(routes) as server:
        listing = _listing(tmp_path, server.port, count)
        args = _download_args(listing, out, "--shard-size", str(size), "--concurrency", "2")
        with (tmp_path / "first.log").open("wb") as log:
            first = subprocess.Popen([sys.executable, "-m", "pairfarm", *args], cwd=REPO,
                                     env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            done = [out / f"{n:08d}_stats.json" for n in range(3)]
            _wait_for(lambda: all(p.exists() for p in done) and gate.waiting >= 2,
                      "3 shards done and shard 3 in flight")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        assert first.returncode == -signal.SIGKILL
        before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
        assert any(p.name.startswith(".00000003") for p in out.iterdir())  # its temp tar
        assert not (out / "00000003_stats.json").exists()
        gate.open()
        rerun = run_cli(*args)
        requested = Counter(r.path for r in server.requests if r.path != "/robots.txt")
    assert "3 already done" in rerun.stdout and "3 shards written" in rerun.stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    for name, data in before.items():  # the finished shards were not written again
        assert (out / name).read_bytes() == data, name
    rows = _rows(out)
    assert sorted(r["url"] for r in rows) == sorted(
        f"http://127.0.0.1:{server.port}/{n}.jpg" for n in range(count))
    assert {r["status"] for r in rows} == {"success"}
    assert len({r["key"] for r in rows}) == count
    # shards 0-2 were fetched by the first run only
    assert all(requested[f"/{n}.jpg"] == 1 for n in range(3 * size))
    for n in range(6):
        stats = json.loads((out / f"{n:08d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == size


def test_named_columns_and_format_then_overwrite_leaves_no_earlier_shard(
        tmp_path: Path) -> None:
    """--input-format for a name that says nothing, --url-col / --caption-col, and
    --incremental-mode overwrite after a longer list: img2dataset deletes the folder, so
    no shard of the earlier run may survive (its other files do here)."""
    routes = {f"/{n}.jpg": hs.route_ok(BODIES[n]) for n in range(5)}
    out = tmp_path / "out"
    listing = tmp_path / "urls.list"
    with hs.server_thread(routes) as server:
        def write(count: int, tag: str) -> None:
            listing.write_text("link,text\n" + "".join(
                f"http://127.0.0.1:{server.port}/{n}.jpg,{tag} {n}\n" for n in range(count)))

        def download(*extra: str) -> str:
            return run_cli("download", str(listing), "-o", str(out), "--allow-cidr",
                           "127.0.0.0/8", "--no-progress", "--input-format", "csv",
                           "--url-col", "link", "--caption-col", "text", "--shard-size",
                           "2", "--decode-threads", "1", *extra).stdout

        write(5, "first")
        download("--output-format", "files")
        assert sorted(p.name for p in out.glob("0*")) == [
            f"{n:08d}{s}" for n in range(3) for s in ("", ".parquet", "_stats.json")]
        assert [r["caption"] for r in _rows(out)] == [f"first {n}" for n in range(5)]
        (out / "notes.md").write_text("mine")
        write(2, "second")
        assert "0 shards written, 1 already done" in download("--output-format", "files")
        said = download("--output-format", "files", "--incremental-mode", "overwrite")
    assert "1 shards written, 0 already done" in said
    assert sorted(p.name for p in out.iterdir()) == [
        "00000000", "00000000.parquet", "00000000_stats.json", "notes.md"]
    assert [r["caption"] for r in _rows(out)] == ["second 0", "second 1"]
    assert sorted(p.name for p in (out / "00000000").iterdir()) == sorted(
        f"{r['key']}.{e}" for r in _rows(out) for e in ("jpg", "txt", "json"))


def test_processes_share_the_shards_each_url_fetched_once(tmp_path: Path) -> None:
    count, size = 16, 4
    routes = {f"/{n}.jpg": hs.route_ok(BODIES[n]) for n in range(count)}
    out = tmp_path / "out"
    with hs.server_thread(routes) as server:
        listing = _listing(tmp_path, server.port, count)
        proc = run_cli(*_download_args(listing, out, "--shard-size", str(size),
                                       "--processes", "2", "--user-agent-token", "farmbot"))
        images = [r for r in server.requests if r.path != "/robots.txt"]
    assert Counter(r.path for r in images) == Counter(f"/{n}.jpg" for n in range(count))
    # the user-agent token reaches the pool's processes (img2dataset's user_agent_token)
    assert {r.headers["user-agent"].split(" ", 1)[0] for r in images} == {"farmbot"}
    assert f"{count} URLs" in proc.stdout and "4 shards written" in proc.stdout
    assert sorted(p.name for p in out.glob("*_stats.json")) == [
        f"{n:08d}_stats.json" for n in range(4)]
    rows = _rows(out)
    assert len(rows) == count and {r["status"] for r in rows} == {"success"}


# -- layouts, encode formats, skip_reencode ------------------------------------------------


@pytest.mark.parametrize("layout", ["webdataset", "files", "parquet"])
def test_each_output_format_reads_back(tmp_path: Path, layout: str) -> None:
    count = 4
    routes = {f"/{n}.jpg": hs.route_ok(BODIES[n]) for n in range(count - 1)}
    out = tmp_path / "out"
    with hs.server_thread(routes) as server:  # the last URL is a 404
        listing = _listing(tmp_path, server.port, count)
        run_cli(*_download_args(listing, out, "--output-format", layout, "--encode-format",
                                "png"))
    table = pq.read_table(out / "00000000.parquet").to_pylist()
    assert [r["status"] for r in table] == ["success"] * 3 + ["failed_to_download"]
    assert json.loads((out / "00000000_stats.json").read_text())["successes"] == 3
    samples = _samples(out, layout, table)
    assert sorted(samples) == sorted(r["key"] for r in table[:3])
    for row in table[:3]:
        image_bytes, caption, meta = samples[row["key"]]
        image = Image.open(io.BytesIO(image_bytes))
        assert image.format == "PNG" and image.size == (row["width"], row["height"])
        assert caption == row["caption"] and meta["url"] == row["url"]
    names = sorted(p.name for p in out.iterdir())
    extra = {"webdataset": ["00000000.tar"], "files": ["00000000"], "parquet": []}[layout]
    assert names == sorted(["00000000.parquet", "00000000_stats.json", *extra])


def _samples(out: Path, layout: str, table: list[dict[str, object]]
             ) -> dict[str, tuple[bytes, str, dict[str, object]]]:
    """key -> (image bytes, caption, metadata) as each layout stores them."""
    if layout == "parquet":
        return {str(r["key"]): (r["png"], r["txt"], r) for r in table  # type: ignore[misc]
                if r["png"] is not None}
    files: dict[str, bytes] = {}
    if layout == "files":
        files = {p.name: p.read_bytes() for p in (out / "00000000").iterdir()}
    else:
        with tarfile.open(out / "00000000.tar") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    keys = {name.split(".", 1)[0] for name in files}
    assert sorted(files) == sorted(f"{k}.{e}" for k in keys for e in ("png", "txt", "json"))
    return {k: (files[f"{k}.png"], files[f"{k}.txt"].decode(), json.loads(files[f"{k}.json"]))
            for k in keys}


@pytest.mark.parametrize(("fmt", "pillow"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats(fmt: str, pillow: str) -> None:
    out = process_image(BODIES[0], ImageSettings(image_size=64, encode_format=fmt))
    image = Image.open(io.BytesIO(out.data))
    assert image.format == pillow and max(image.size) == 64


def _zlib_level_class(png: bytes) -> int:
    """FLEVEL of the first IDAT's zlib header: 0 (level 0-1), 1 (2-5), 2 (6), 3 (7-9)."""
    at = png.index(b"IDAT") + 4
    return png[at + 1] >> 6


def test_png_quality_is_the_compression_level_as_img2dataset() -> None:
    """img2dataset's Resizer encodes png with IMWRITE_PNG_COMPRESSION = encode_quality."""
    body = hs.jpeg_bytes(300, 200, seed=3)
    out = {q: process_image(body, ImageSettings(image_size=128, encode_format="png",
                                                 quality=q)).data for q in (0, 1, 9, None)}
    assert {q: _zlib_level_class(d) for q, d in out.items()} == {0: 0, 1: 0, 9: 3, None: 2}
    assert len(out[0]) > len(out[9])  # level 0 stores the pixels
    pixels = {q: _pixels(d).tobytes() for q, d in out.items()}
    assert len(set(pixels.values())) == 1  # lossless at every level
    for bad in (10, 95):
        with pytest.raises(SettingsError, match="compression level"):
            ImageSettings(encode_format="png", quality=bad)
    assert ImageSettings(quality=None).encode_quality == 95


def test_png_quality_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("http://127.0.0.1:9/a.jpg\n")
    proc = run_cli("download", str(listing), "-o", str(tmp_path / "out"), "--encode-format",
                   "png", "--quality", "95", check=False)
    assert proc.returncode != 0 and "compression level" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_skip_reencode_keeps_the_downloaded_bytes_only_when_nothing_changes() -> None:
    body = BODIES[1]
    keep = ImageSettings(resize_mode="no", skip_reencode=True)
    assert process_image(body, keep).data == body
    assert process_image(body, ImageSettings(resize_mode="no")).data != body  # re-encoded
    resized = ImageSettings(resize_mode="keep_ratio", image_size=64, skip_reencode=True)
    assert process_image(body, resized).data != body
    as_png = ImageSettings(resize_mode="no", skip_reencode=True, encode_format="png")
    assert Image.open(io.BytesIO(process_image(body, as_png).data)).format == "PNG"
    boxes = RowInput(boxes=((0.1, 0.1, 0.3, 0.3),))
    assert process_image(body, keep, boxes).data != body  # a blur is a change


def test_skip_reencode_through_the_command_in_the_parquet_layout(tmp_path: Path) -> None:
    routes = {f"/{n}.jpg": hs.route_ok(BODIES[n]) for n in range(3)}
    out = tmp_path / "out"
    with hs.server_thread(routes) as server:
        listing = _listing(tmp_path, server.port, 3)
        run_cli("download", str(listing), "-o", str(out), "--allow-cidr", "127.0.0.0/8",
                "--no-progress", "--resize-mode", "no", "--skip-reencode",
                "--output-format", "parquet")
    rows = pq.read_table(out / "00000000.parquet").to_pylist()
    assert [r["jpg"] for r in rows] == BODIES[:3]


# -- blur -----------------------------------------------------------------------------


def _pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("mode", ["no", "border"])
def test_blur_changes_pixels_only_in_the_grown_box_and_its_rim(mode: str) -> None:
    body = hs.jpeg_bytes(400, 300, seed=9)
    box = (0.25, 0.2, 0.5, 0.6)
    settings = ImageSettings(resize_mode=mode, image_size=200, encode_format="png")
    plain = _pixels(process_image(body, settings).data)
    blurred = _pixels(process_image(body, settings, RowInput(boxes=(box,))).data)
    # relative to the resized image (before the border: 200x150, 25 px of white above)
    size, top = ((400, 300), 0) if mode == "no" else ((200, 150), 25)
    x0, y0, x1, y1, side = grown_box(box, size)
    rim = int(3 * 0.1 * side) + 2
    changed = _changed_box(plain, blurred)
    assert changed is not None
    cx0, cy0, cx1, cy1 = changed
    assert cx0 >= x0 - rim and cy0 >= top + y0 - rim
    assert cx1 <= x1 + rim and cy1 <= top + y1 + rim
    inner = (int(box[0] * size[0]) + 2, top + int(box[1] * size[1]) + 2,
             int(box[2] * size[0]) - 2, top + int(box[3] * size[1]) - 2)
    assert plain.crop(inner).tobytes() != blurred.crop(inner).tobytes()


def _changed_box(a: Image.Image, b: Image.Image) -> tuple[int, int, int, int] | None:
    return ImageChops.difference(a, b).getbbox()


def test_a_box_reaching_the_edges_blurs_the_last_row_and_column_too() -> None:
    """img2dataset's mask[y0:y1, x0:x1] = 1 with slices clamped at the image's size: a
    box over the whole image masks every pixel, so the result is the blurred image."""
    image = _pixels(hs.jpeg_bytes(120, 90, seed=4))
    assert grown_box((0.0, 0.0, 1.0, 1.0), image.size)[:4] == (0, 0, 120, 90)
    whole = blur_boxes(image, [(0.0, 0.0, 1.0, 1.0)])
    assert whole.tobytes() == image.filter(ImageFilter.GaussianBlur(0.1 * 120)).tobytes()


def test_box_cells_as_img2dataset_stores_them() -> None:
    assert parse_boxes("[[0.1, 0.2, 0.3, 0.4]]") == ((0.1, 0.2, 0.3, 0.4),)
    assert parse_boxes([[0, 0, 1, 1], [0.5, 0.5, 0.6, 0.6]])[1] == (0.5, 0.5, 0.6, 0.6)
    assert parse_boxes(None) == () == parse_boxes("[]")
    for bad in ("[[0.1, 0.2, 0.3]]", "[[0.5, 0.2, 0.3, 0.4]]", "{}", "[1, 2]"):
        with pytest.raises(ValueError, match="box"):
            parse_boxes(bad)


def test_bbox_col_through_the_command(tmp_path: Path) -> None:
    routes = {f"/{n}.jpg": hs.route_ok(BODIES[n]) for n in range(2)}
    out = {name: tmp_path / name for name in ("plain", "blurred")}
    with hs.server_thread(routes) as server:
        boxes = [[[0.0, 0.0, 0.5, 0.5]], []]
        listing = _listing(tmp_path, server.port, 2, faces=boxes)  # type: ignore[arg-type]
        for name, extra in (("plain", ()), ("blurred", ("--bbox-col", "faces"))):
            run_cli(*_download_args(listing, out[name], "--output-format", "parquet",
                                    "--encode-format", "png", *extra))
    plain, blurred = (pq.read_table(out[n] / "00000000.parquet").to_pylist() for n in out)
    assert plain[0]["png"] != blurred[0]["png"]  # the row with a face
    assert plain[1]["png"] == blurred[1]["png"]  # the row without
    assert blurred[0]["faces"] == boxes[0]  # kept as an extra column, as img2dataset

