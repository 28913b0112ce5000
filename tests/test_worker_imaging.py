"""The image pipeline on real images made in the test."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pairfarm.outcomes import Outcome
from tests import hostile_server as hs
from worker.errors import ImageRejected, SettingsError
from worker.imaging import output_size, process_image
from worker.settings import ImageSettings


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(("mode", "size", "expected"), [
    ("no", (800, 600), (800, 600)),
    ("keep_ratio", (800, 600), (341, 256)),
    ("keep_ratio_largest", (800, 600), (256, 192)),
    ("center_crop", (800, 600), (256, 256)),
    ("border", (800, 600), (256, 256)),
    ("border", (600, 800), (256, 256)),
    ("keep_ratio", (100, 50), (512, 256)),  # img2dataset upscales by default
])
def test_resize_modes(mode: str, size: tuple[int, int], expected: tuple[int, int]) -> None:
    out = process_image(hs.jpeg_bytes(*size, quality=100), ImageSettings(resize_mode=mode))
    assert (out.width, out.height) == expected == _open(out.data).size
    assert (out.original_width, out.original_height) == size


def test_resize_only_if_bigger_keeps_small_images() -> None:
    settings = ImageSettings(resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert output_size((100, 50), settings) == (100, 50)
    assert output_size((1000, 500), settings) == (512, 256)


def test_border_pads_with_white_and_center_crop_keeps_the_middle() -> None:
    red = Image.new("RGB", (800, 400), (255, 0, 0))
    buf = io.BytesIO()
    red.save(buf, "PNG", compress_level=0)
    bordered = _open(process_image(buf.getvalue(), ImageSettings(resize_mode="border")).data)
    assert bordered.getpixel((128, 5)) == pytest.approx((255, 255, 255), abs=8)
    assert bordered.getpixel((128, 128))[0] > 240  # type: ignore[index]
    cropped = _open(process_image(buf.getvalue(), ImageSettings(resize_mode="center_crop")).data)
    assert cropped.size == (256, 256)


def test_exif_orientation_is_applied() -> None:
    data = hs.jpeg_bytes(400, 200, exif_orientation=6)  # stored landscape, shown portrait
    out = process_image(data, ImageSettings(resize_mode="keep_ratio_largest"))
    assert (out.original_width, out.original_height) == (200, 400)
    assert (out.width, out.height) == (128, 256)


def test_transparency_is_composited_on_white() -> None:
    data = hs.png_bytes(300, 300, mode="RGBA", color=(0, 0, 0, 0))
    out = _open(process_image(data, ImageSettings(resize_mode="no", encode_format="webp",
                                                  quality=100)).data)
    assert out.mode == "RGB"
    colors = set(out.get_flattened_data())  # type: ignore[attr-defined]
    assert max(colors) >= (250, 250, 250)  # transparent pixels became white, not black


def test_sha256_is_of_the_original_bytes() -> None:
    import hashlib

    data = hs.jpeg_bytes(300, 300)
    assert process_image(data, ImageSettings()).sha256 == hashlib.sha256(data).hexdigest()


def test_jpeg_draft_mode_decodes_at_reduced_scale() -> None:
    data = hs.jpeg_bytes(2000, 1600)
    image = _open(data)
    image.draft("RGB", (250, 200))
    assert image.size == (250, 200)  # what _draft asks for when the target is 1/8
    out = process_image(data, ImageSettings(resize_mode="keep_ratio_largest"))
    assert (out.width, out.height) == (256, 205)


@pytest.mark.parametrize(("body", "outcome"), [
    (b"\xff\xd8" + b"\0" * 3000, Outcome.TOO_SMALL),
    (b"<html>" + b"a" * 9000, Outcome.NOT_IMAGE),
    (hs.png_bomb_header(30000, 30000), Outcome.BOMB),
    (hs.png_bomb_header(7000, 7000), Outcome.BOMB),  # 49 MP: over our cap, under Pillow's
    (hs.jpeg_bytes(800, 600)[:6000], Outcome.DECODE_ERROR),
])
def test_rejections_are_named(body: bytes, outcome: Outcome) -> None:
    with pytest.raises(ImageRejected) as info:
        process_image(body, ImageSettings())
    assert info.value.outcome is outcome


def test_unsafe_formats_are_not_decoded() -> None:
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 50).save(buf, "TIFF")
    with pytest.raises(ImageRejected) as info:
        process_image(buf.getvalue(), ImageSettings())
    assert info.value.outcome is Outcome.NOT_IMAGE


def test_pillow_bomb_warning_becomes_an_error() -> None:
    settings = ImageSettings(max_pixels=10**12)  # our cap off: Pillow's own checks remain
    with pytest.raises(ImageRejected) as info:
        process_image(hs.png_bomb_header(10000, 10000), settings)  # 100 MP > 89 MP warning
    assert info.value.outcome is Outcome.BOMB


@pytest.mark.parametrize(("size", "settings"), [
    ((100, 100), ImageSettings(min_image_size=200)),
    ((1000, 100), ImageSettings(max_aspect_ratio=3)),
])
def test_size_filters(size: tuple[int, int], settings: ImageSettings) -> None:
    with pytest.raises(ImageRejected) as info:
        process_image(hs.jpeg_bytes(*size), settings)
    assert info.value.outcome is Outcome.SIZE_FILTERED


def _noise_png(side: int) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_interpolation_follows_img2dataset_names_and_defaults() -> None:
    """Shrinking noise 4x: area averaging (the default, OpenCV's INTER_AREA) averages 16
    pixels into one and flattens the noise; nearest keeps it."""
    import numpy as np

    body = _noise_png(512)
    std = {}
    for name in ("area", "nearest"):
        settings = ImageSettings(resize_mode="keep_ratio", image_size=128, quality=100,
                                 downscale_interpolation=name)
        std[name] = float(np.asarray(_open(process_image(body, settings).data)).std())
    assert ImageSettings().downscale_interpolation == "area"
    assert ImageSettings().upscale_interpolation == "lanczos"
    assert std["area"] < 0.5 * std["nearest"]
    with pytest.raises(SettingsError, match="interpolation"):
        ImageSettings(upscale_interpolation="sinc")
