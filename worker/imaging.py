"""Bodies to dataset images: validate, decode, orient, resize, encode. Blocking code.

``process_image(body, settings, row)`` runs in a worker thread (``worker.batch`` sends it
there with ``trio.to_thread.run_sync``); Pillow releases the GIL while it decodes,
resizes and encodes, so the decode threads use the cores.

The checks, in order, each ending in a named outcome:

0. with ``verify_hash`` set, the body's ``compute_hash`` digest differs from the row's
   (``RowInput.expected_hash``): ``hash_mismatch``;
1. fewer than ``min_bytes`` bytes (LAION's 5 KB rule): ``too_small``;
2. not one of the safe formats (``Image.open(..., formats=...)``): ``not_image``;
3. the header declares more than ``max_pixels`` (or Pillow's bomb warning fires, which
   is turned into an error): ``bomb``, before a pixel is decoded;
4. smaller than ``min_image_size`` or wider than ``max_aspect_ratio``: ``size_filtered``;
5. truncated or corrupt data while decoding: ``decode_error``.

``open_image`` does the checks and sets JPEG draft mode, and tells how much memory
decoding will take (``OpenedImage.cost``) before a pixel is decoded, so that the
caller can count it against a budget; ``finish_image`` decodes, resizes and encodes.
``process_image`` is the two in a row.

Decoding uses JPEG draft mode (DCT scaling) when the output is at most half the
size of the original, orientation follows EXIF, transparency is composited on white,
and resizing follows img2dataset's modes (``no``, ``keep_ratio``,
``keep_ratio_largest``, ``center_crop``, ``border``) and its interpolation defaults:
area averaging (Pillow's BOX filter, OpenCV's INTER_AREA) when shrinking, Lanczos when
enlarging. Area averaging took ~0.7x the CPU of Lanczos on the benchmark's JPEGs.
The row's face boxes (``RowInput.boxes``, ``worker.blur``) are blurred after the resize,
before the crop or border, as img2dataset does. With ``skip_reencode`` the downloaded
bytes are kept (still decoded once, so that corrupt data is ``decode_error``) when the
output would be the same pixels in the same format. The shard's ``sha256`` (always),
``compute_hash`` digest and ``exif`` are of the downloaded bytes (``worker.digests``).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from pairfarm.outcomes import Outcome
from worker import digests
from worker.blur import Box, blur_boxes
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
_SAVE_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
#: Pillow's format names by the encode format they already are
_SOURCE_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
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
    #: the ``compute_hash`` digest of the downloaded bytes, by its name
    digests: tuple[tuple[str, str], ...] = ()
    #: img2dataset's ``exif`` (JSON text); None when not extracted or unreadable
    exif: str | None = None


@dataclass(frozen=True, slots=True)
class RowInput:
    """What a candidate's own input row asks of its image."""

    #: the ``compute_hash`` digest its bytes must have (``verify_hash``)
    expected_hash: str | None = None
    #: relative face boxes to blur (``bbox_col``)
    boxes: tuple[Box, ...] = ()


NO_ROW = RowInput()


@dataclass(frozen=True, slots=True)
class OpenedImage:
    """A body whose header passed the checks, its draft set; nothing decoded yet."""

    image: Image.Image
    body: bytes
    settings: ImageSettings
    oriented: tuple[int, int]
    target: tuple[int, int]
    row: RowInput
    #: bytes decoding, converting and resizing may hold at once (an upper estimate)
    cost: int

    def close(self) -> None:
        self.image.close()


def process_image(body: bytes, settings: ImageSettings, row: RowInput = NO_ROW
                  ) -> ProcessedImage:
    """The encoded output image of ``body``; raises ``ImageRejected`` with the outcome."""
    opened = open_image(body, settings, row)
    try:
        return finish_image(opened)
    finally:
        opened.close()


def open_image(body: bytes, settings: ImageSettings, row: RowInput = NO_ROW) -> OpenedImage:
    """Checks 0-4 on ``body`` and its header, the JPEG draft set; raises
    ``ImageRejected``."""
    if settings.verify_hash is not None:
        digests.verify(body, settings.compute_hash, row.expected_hash)
    if len(body) < settings.min_bytes:
        raise ImageRejected(Outcome.TOO_SMALL, f"{len(body)} bytes < {settings.min_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(body, settings)
    try:
        return _checked(image, body, settings, row)
    except BaseException:
        image.close()
        raise


def _checked(image: Image.Image, body: bytes, settings: ImageSettings, row: RowInput
             ) -> OpenedImage:
    oriented = _oriented_size(image)
    _check_filters(oriented, settings)
    target = output_size(oriented, settings)
    full = image.size
    try:
        _draft(image, oriented, target)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(Outcome.DECODE_ERROR, f"{type(exc).__name__}: {exc}") from exc
    return OpenedImage(image=image, body=body, settings=settings, oriented=oriented,
                       target=target, row=row, cost=decode_cost(image, full, target))


def finish_image(opened: OpenedImage) -> ProcessedImage:
    """Decode, orient, resize and encode ``opened``; raises ``ImageRejected``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _convert(opened)


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


def _convert(opened: OpenedImage) -> ProcessedImage:
    try:
        data, size = _pixels(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageRejected(Outcome.DECODE_ERROR, f"{type(exc).__name__}: {exc}") from exc
    settings, body = opened.settings, opened.body
    sha256 = hashlib.sha256(body).hexdigest()
    named = (sha256 if settings.compute_hash == "sha256"  # the default: hashed once
             else digests.digest(body, settings.compute_hash))
    return ProcessedImage(data=data, width=size[0], height=size[1],
                          original_width=opened.oriented[0], original_height=opened.oriented[1],
                          sha256=sha256, source_format=opened.image.format or "",
                          digests=((settings.compute_hash, named),),
                          exif=digests.exif_json(body) if settings.extract_exif else None)


def _pixels(opened: OpenedImage) -> tuple[bytes, tuple[int, int]]:
    """The output image's bytes and size: the downloaded bytes themselves when
    ``keeps_original``, else decoded, oriented, resized, blurred, fitted and encoded."""
    image, settings = opened.image, opened.settings
    if keeps_original(opened):
        image.load()  # corrupt data still ends decode_error
        return opened.body, image.size
    scaled = _scale(_to_rgb(_upright(image)), opened.target, settings)
    out = _fit(blur_boxes(scaled, opened.row.boxes), settings)
    return _encode(out, settings), out.size


def keeps_original(opened: OpenedImage) -> bool:
    """``skip_reencode`` and nothing to change: already ``encode_format``, not turned,
    no transparency, no box to blur, and no resize, crop or border."""
    image, settings = opened.image, opened.settings
    return (settings.skip_reencode and not opened.row.boxes
            and _SOURCE_FORMAT.get(image.format or "") == settings.encode_format
            and not _needs_turning(image) and not _transparent(image)
            and opened.target == image.size and _fitted(image.size, settings))


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _fitted(size: tuple[int, int], settings: ImageSettings) -> bool:
    """Whether the crop or border of ``resize_mode`` leaves ``size`` as it is."""
    side = settings.image_size
    if settings.resize_mode == "center_crop":
        return size[0] <= side and size[1] <= side
    if settings.resize_mode == "border":
        return size[0] >= side and size[1] >= side
    return True


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel in Pillow's memory (RGB takes 4, like RGBA)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_cost(image: Image.Image, full: tuple[int, int], target: tuple[int, int]) -> int:
    """Upper estimate of the bytes ``finish_image`` holds at once for ``image``.

    The decoded pixels (after the JPEG draft), a second copy for EXIF orientation, the
    RGB / RGBA copies of ``_to_rgb``, the resize's intermediate, and the decoders' own
    buffers: a progressive JPEG keeps every DCT coefficient of the full-size image
    (2 bytes per component and pixel) whatever the draft; WebP is decoded into two
    canvases of its own and a bytes object before Pillow copies it.
    """
    width, height = image.size
    pixels = width * height
    decoded = pixels * _pixel_bytes(image.mode) * (2 if _needs_turning(image) else 1)
    resized = 4 * (max(target[0] * height, width * target[1]) + target[0] * target[1])
    return decoded + _converted(image, pixels) + resized + _decoder_buffers(image, full)


def _converted(image: Image.Image, pixels: int) -> int:
    """Bytes of the copies ``_to_rgb`` makes (an RGBA copy, then the RGB canvas)."""
    if image.mode == "RGB":
        return 0
    if image.mode == "RGBA":
        return 4 * pixels
    return 8 * pixels if _transparent(image) else 4 * pixels


def _decoder_buffers(image: Image.Image, full: tuple[int, int]) -> int:
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        return _jpeg_coefficients(image, full)
    if image.format == "WEBP":
        # libwebp's canvas and the frame's bytes; measured ~2 bytes per pixel beyond
        # Pillow's image on a 12 MP WebP (Pillow 13), counted 3 times over
        return 6 * full[0] * full[1]
    return 0


def _jpeg_coefficients(image: Image.Image, full: tuple[int, int]) -> int:
    """A progressive JPEG's DCT coefficients: 2 bytes per sample of each component,
    at its own sampling (Pillow's ``layer``: id, horizontal, vertical, table)."""
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    most_h = max(layer[1] for layer in layers)
    most_v = max(layer[2] for layer in layers)
    samples = sum(_blocks(full[0] * layer[1], most_h) * _blocks(full[1] * layer[2], most_v)
                  for layer in layers)
    return 2 * 64 * samples


def _blocks(samples_times_factor: int, most: int) -> int:
    return math.ceil(samples_times_factor / most / 8)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, read from the header alone: Pillow's ``getexif`` decodes a
    whole PNG to look for an eXIf chunk after the pixels, so a PNG's counts only when
    its header has one."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    orientation = image.getexif().get(0x0112, 1)
    return orientation if isinstance(orientation, int) else 1


def _needs_turning(image: Image.Image) -> bool:
    return _orientation(image) in range(2, 9)


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (``exif_transpose`` copies the
    image even when there is nothing to turn, so it is only called when there is)."""
    return ImageOps.exif_transpose(image) if _needs_turning(image) else image


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if _orientation(image) in _TRANSPOSED_ORIENTATIONS else (width, height)


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
    """RGB, transparency composited on white (pasted through its alpha: one RGB copy)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba)
        return canvas
    return image.convert("RGB")


def _scale(image: Image.Image, target: tuple[int, int], settings: ImageSettings) -> Image.Image:
    if image.size == target:
        return image
    shrinking = target[0] * target[1] < image.width * image.height
    name = settings.downscale_interpolation if shrinking else settings.upscale_interpolation
    return image.resize(target, _FILTERS[name])


def _fit(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """The crop or border of ``resize_mode`` (img2dataset's, after its resize)."""
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
    if settings.encode_format == "png":  # img2dataset: encode_quality is the png compression
        image.save(out, format="PNG", compress_level=settings.encode_quality)
    else:
        image.save(out, format=_SAVE_FORMAT[settings.encode_format],
                   quality=settings.encode_quality)
    return out.getvalue()
