"""What a body is comes from its bytes (``worker.sniff``), not from its Content-Type;
LAION's 5 KB floor is a setting (``--min-body-bytes``)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import trio
import trio.testing
from PIL import Image

from pairfarm.outcomes import Outcome
from tests import hostile_server as hs
from tests.conftest import cli_env, run_cli
from worker.batch import Network, Stage, open_stage
from worker.errors import FetchFailure, SettingsError
from worker.settings import SAFE_FORMATS, FetchSettings, ImageSettings, PipelineSettings
from worker.sniff import SNIFF_BYTES, image_format, what_it_is

SETTINGS = PipelineSettings(fetch=FetchSettings(deadline=20, concurrency=8), decode_threads=1)


def _encoded(fmt: str, size: tuple[int, int] = (200, 150)) -> bytes:
    image = Image.effect_noise(size, 64).convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


IMAGES = {fmt: _encoded(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP")}
HTML = b"<!DOCTYPE html><html><head><title>404</title></head><body>" + b"gone " * 2000


# -- the sniff on its own -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(IMAGES))
def test_each_allowed_format_is_known_by_its_first_bytes(fmt: str) -> None:
    assert image_format(IMAGES[fmt][:SNIFF_BYTES], SAFE_FORMATS) == fmt


@pytest.mark.parametrize(("head", "name"), [
    (HTML, "HTML"), (b"\xef\xbb\xbf  <html lang=en>", "HTML"), (b"<?xml version='1.0'?>", "XML"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'>", "SVG"), (b"%PDF-1.7\n", "PDF"),
    (b'{"error": "not found"}', "JSON"), (b"Not Found\r\n", "text"),
    (b"\0\0\0\x01garbage\xff", "binary"),
])
def test_what_is_no_image_is_named(head: bytes, name: str) -> None:
    assert image_format(head[:SNIFF_BYTES], SAFE_FORMATS) is None
    assert what_it_is(head[:SNIFF_BYTES]) == name


def test_a_format_the_decoder_does_not_open_is_no_image() -> None:
    tiff = _encoded("TIFF")
    assert image_format(tiff[:SNIFF_BYTES], SAFE_FORMATS) is None
    assert image_format(tiff[:SNIFF_BYTES], (*SAFE_FORMATS, "TIFF")) == "TIFF"


# -- the fetcher on a real server ------------------------------------------------------------


def _run_virtual(fn: object) -> object:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


async def _outcome(stage: Stage, url: str) -> Outcome:
    try:
        fetched = await stage.fetch(url)
        await stage.decode(fetched)
    except FetchFailure as exc:
        return exc.outcome
    return Outcome.OK


def _outcomes(routes: dict[str, hs.Handler], settings: PipelineSettings = SETTINGS
              ) -> tuple[dict[str, Outcome], int]:
    """Each route's outcome, and the bytes the fetcher read off the wire in all."""
    async def main() -> tuple[dict[str, Outcome], int]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, routes)
            async with open_stage(settings, Network(resolver=dns, dialer=dialer)) as stage:
                found = {path: await _outcome(stage, server.url(path)) for path in routes}
                wire = stage.wire_bytes
            nursery.cancel_scope.cancel()
        return found, wire

    return _run_virtual(main)  # type: ignore[return-value]


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream",
                                          "text/plain", ""])
def test_images_served_with_a_wrong_type_are_kept(content_type: str) -> None:
    routes = {f"/{fmt.lower()}": hs.route_ok(body, content_type) for fmt, body in IMAGES.items()}
    found, _ = _outcomes(routes)
    assert found == dict.fromkeys(routes, Outcome.OK)


def test_html_and_text_served_as_images_are_refused_on_their_first_bytes() -> None:
    """50 MB of HTML typed image/jpeg, without a length: refused once its first bytes
    are in, never read to the 16 MB cap (it ended too_large, 16 MB read, when the
    type decided)."""
    endless = hs.route_chunked(HTML * (50 * 1024 * 1024 // len(HTML)), "image/jpeg")
    routes = {"/endless.jpg": endless,
              "/error.png": hs.route_ok(b"Service Unavailable\n" * 600, "image/png"),
              "/json.webp": hs.route_ok(b'{"error": "gone"}' + b" " * 9000, "image/webp")}
    found, wire = _outcomes(routes)
    assert found == dict.fromkeys(routes, Outcome.NOT_IMAGE)
    assert wire < 2 * 1024 * 1024


def test_the_refusal_names_what_the_body_is_and_its_type() -> None:
    async def main() -> str:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, {"/a.jpg": hs.route_ok(HTML, "image/jpeg")})
            async with open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage:
                with pytest.raises(FetchFailure) as caught:
                    await stage.fetch(server.url("/a.jpg"))
            nursery.cancel_scope.cancel()
        return caught.value.detail

    assert _run_virtual(main) == "HTML, not an image (Content-Type: image/jpeg)"


def test_what_the_headers_prove_is_still_refused_before_the_body() -> None:
    """A declared length over the cap and an opt-out end before a body byte is read."""
    routes = {"/huge.jpg": hs.route_stream(50 * 1024 * 1024, declare=True),
              "/noai.jpg": hs.route_ok(IMAGES["JPEG"], headers={"X-Robots-Tag": "noai"})}
    found, wire = _outcomes(routes)
    assert found == {"/huge.jpg": Outcome.TOO_LARGE, "/noai.jpg": Outcome.OPTED_OUT}
    assert wire < 1024 * 1024


# -- LAION's 5 KB rule, a setting --------------------------------------------------------------

SMALL_JPEG = hs.jpeg_bytes(24, 24, quality=50)


def test_small_bodies_end_too_small_by_default_and_are_kept_with_no_floor() -> None:
    assert len(SMALL_JPEG) < 5120
    routes = {"/small.jpg": hs.route_ok(SMALL_JPEG), "/empty.jpg": hs.route_ok(b"")}
    found, _ = _outcomes(routes)
    assert found == {"/small.jpg": Outcome.TOO_SMALL, "/empty.jpg": Outcome.TOO_SMALL}
    no_floor = replace(SETTINGS, image=ImageSettings(min_bytes=0))
    found, _ = _outcomes(routes, no_floor)
    assert found == {"/small.jpg": Outcome.OK, "/empty.jpg": Outcome.NOT_IMAGE}
    higher = replace(SETTINGS, image=ImageSettings(min_bytes=len(IMAGES["PNG"]) + 1))
    found, _ = _outcomes({"/a.png": hs.route_ok(IMAGES["PNG"], "image/png")}, higher)
    assert found == {"/a.png": Outcome.TOO_SMALL}


def test_a_negative_floor_is_refused() -> None:
    with pytest.raises(SettingsError, match="min_bytes"):
        ImageSettings(min_bytes=-1)


@pytest.mark.parametrize(("args", "env", "expected"), [
    ((), {}, "too_small"),
    (("--min-body-bytes", "0"), {}, "ok"),
    ((), {"PAIRFARM_MIN_BODY_BYTES": "0"}, "ok"),
])
def test_min_body_bytes_from_the_command_line(tmp_path: Path, args: tuple[str, ...],
                                              env: dict[str, str], expected: str) -> None:
    with hs.server_thread({"/small.jpg": hs.route_ok(SMALL_JPEG)}) as server:
        url = f"http://127.0.0.1:{server.port}/small.jpg"
        (tmp_path / "urls.txt").write_text(url + "\n")
        run_cli("download", str(tmp_path / "urls.txt"), "-o", str(tmp_path / "out"),
                "--allow-cidr", "127.0.0.0/8", "--no-progress", *args, env=cli_env(**env))
    rows = pq.read_table(tmp_path / "out" / "00000000.parquet").to_pylist()
    assert [row["error_class"] or "ok" for row in rows] == [expected]
