"""Bodies to dataset images: validate, decode, orient, resize, encode. Blocking code.

``process_image(body, settings)`` runs in a worker thread (``worker.batch`` sends it
there with ``trio.to_thread.run_sync``); Pillow releases the GIL while it decodes,
resizes and encodes, so the decode threads use the cores.

The checks, in order, each ending in a named outcome:

1. fewer than ``min_bytes`` bytes (LAION's 5 KB rule): ``too_small``;
2. not one of the safe formats (``Image.open(..., formats=...)``): ``not_image``;
3. the header declares more than ``max_pixels`` (or Pillow's bomb warning fires, which
   is turned into an error): ``bomb``, before a pixel is decoded;
4. smaller than ``min_image_size`` or wider than ``max_aspect_ratio``: ``size_filtered``;
5. truncated or corrupt data while decoding: ``decode_error``.

Decoding uses JPEG draft mode (DCT scaling) when the output is at most half the
size of the original, orientation follows EXIF, transparency is composited on white,
and resizing follows img2dataset's modes (``no``, ``keep_ratio``,
``keep_ratio_largest``, ``center_crop``, ``border``) and its interpolation defaults:
area averaging (Pillow's BOX filter, OpenCV's INTER_AREA) when shrinking, Lanczos when
enlarging. Area averaging took ~0.7x the CPU of Lanczos on the benchmark's JPEGs.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from pairfarm.outcomes import Outcome
from worker.errors import ImageRejected
from worker.settings import ImageSettings

_WHITE = (255, 255, 255)
#: img2dataset's interpolation names (OpenCV flags) as Pillow filters
_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR, "cubic": Image.Resampling.BICUBIC,
    "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS, "lanczos4": Image.Resampling.LANCZOS,
}
_SAVE_FORMAT = {"jpg": "JPEG", "webp": "WEBP"}
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str
    source_format: str


def process_image(body: bytes, settings: ImageSettings) -> ProcessedImage:
    """The encoded output image of ``body``; raises ``ImageRejected`` with the outcome."""
    if len(body) < settings.min_bytes:
        raise ImageRejected(Outcome.TOO_SMALL, f"{len(body)} bytes < {settings.min_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(body, settings) as image:
            return _convert(image, body, settings)


def _open(body: bytes, settings: ImageSettings) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(body), formats=list(settings.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(Outcome.BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(Outcome.NOT_IMAGE, "not a JPEG/PNG/WebP/GIF/BMP image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(Outcome.DECODE_ERROR, f"bad header: {exc}") from exc
    width, height = image.size
    if width * height > settings.max_pixels:
        image.close()
        raise ImageRejected(Outcome.BOMB, f"{width}x{height} > {settings.max_pixels} pixels")
    return image


def _convert(image: Image.Image, body: bytes, settings: ImageSettings) -> ProcessedImage:
    oriented = _oriented_size(image)
    _check_filters(oriented, settings)
    target = output_size(oriented, settings)
    try:
        _draft(image, oriented, target)
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        out = _resize(rgb, target, settings)
        data = _encode(out, settings)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageRejected(Outcome.DECODE_ERROR, f"{type(exc).__name__}: {exc}") from exc
    return ProcessedImage(data=data, width=out.width, height=out.height,
                          original_width=oriented[0], original_height=oriented[1],
                          sha256=hashlib.sha256(body).hexdigest(),
                          source_format=image.format or "")


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def _check_filters(size: tuple[int, int], settings: ImageSettings) -> None:
    width, height = size
    if min(width, height) < settings.min_image_size:
        raise ImageRejected(Outcome.SIZE_FILTERED,
                            f"{width}x{height} under {settings.min_image_size} px")
    if max(width, height) / max(1, min(width, height)) > settings.max_aspect_ratio:
        raise ImageRejected(Outcome.SIZE_FILTERED,
                            f"{width}x{height} over aspect ratio {settings.max_aspect_ratio:g}")


def output_size(size: tuple[int, int], settings: ImageSettings) -> tuple[int, int]:
    """The size the image is resized to before any crop or border (img2dataset's rule)."""
    width, height = size
    side = settings.image_size
    mode = settings.resize_mode
    if mode == "no":
        return size
    short_side = mode in ("keep_ratio", "center_crop")
    reference = min(width, height) if short_side else max(width, height)
    if settings.resize_only_if_bigger and reference <= side:
        return size
    scale = side / reference
    return max(1, round(width * scale)), max(1, round(height * scale))


def _draft(image: Image.Image, oriented: tuple[int, int], target: tuple[int, int]) -> None:
    """JPEG DCT scaling: decode at the smallest 1/2, 1/4 or 1/8 scale still >= target."""
    if image.format not in ("JPEG", "MPO"):
        return
    scale = max(target[0] / oriented[0], target[1] / oriented[1])
    if scale > 0.5:
        return
    width, height = image.size
    image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, target: tuple[int, int], settings: ImageSettings) -> Image.Image:
    if image.size != target:
        shrinking = target[0] * target[1] < image.width * image.height
        name = settings.downscale_interpolation if shrinking else settings.upscale_interpolation
        image = image.resize(target, _FILTERS[name])
    if settings.resize_mode == "center_crop":
        return _center_crop(image, settings.image_size)
    if settings.resize_mode == "border":
        return _border(image, settings.image_size)
    return image


def _center_crop(image: Image.Image, side: int) -> Image.Image:
    left = max(0, (image.width - side) // 2)
    top = max(0, (image.height - side) // 2)
    return image.crop((left, top, left + min(side, image.width), top + min(side, image.height)))


def _border(image: Image.Image, side: int) -> Image.Image:
    if image.size == (side, side):
        return image
    canvas = Image.new("RGB", (max(side, image.width), max(side, image.height)), _WHITE)
    canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
    return canvas


def _encode(image: Image.Image, settings: ImageSettings) -> bytes:
    out = io.BytesIO()
    image.save(out, format=_SAVE_FORMAT[settings.output_format], quality=settings.quality)
    return out.getvalue()
