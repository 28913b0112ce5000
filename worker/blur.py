"""Face-box blurring, img2dataset's ``BoundingBoxBlurrer`` on Pillow. Blocking code.

A row's boxes (``--bbox-col``) are ``[x_min, y_min, x_max, y_max]`` floats in ``[0, 1]``,
relative to the image (so they hold for the resized image too; img2dataset blurs after
resizing, before the crop or border, and so do we). As img2dataset (after the ImageNet
face-obfuscation code): each box in pixels is grown by 10 % of its larger side on every
side and clipped to the image; the mask of the grown boxes and the image are blurred
with one Gaussian of sigma 0.1 x the largest box side; the output is the image where
the blurred mask is 0 and the blurred image where it is 1, mixed in between. So pixels
change inside the grown boxes and in a soft rim of about 3 sigma around them, nowhere
else.

``parse_boxes`` reads a cell as stored in an input file: a list of 4-number lists (a
parquet list column) or the same as JSON text (csv / tsv / json); errors are
``ValueError`` naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFilter

Box = tuple[float, float, float, float]


def parse_boxes(value: object) -> tuple[Box, ...]:
    """The boxes of one input cell (None or empty: no box)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes):
        value = json.loads(value)
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(f"boxes must be a list of [x0, y0, x1, y1], got {value!r:.80}")
    return tuple(_box(item) for item in value)


def _box(item: object) -> Box:
    if not isinstance(item, Sequence) or isinstance(item, str | bytes) or len(item) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {item!r:.80}")
    x0, y0, x1, y1 = (float(v) for v in item)
    if not all(0 <= v <= 1 for v in (x0, y0, x1, y1)) or x0 > x1 or y0 > y1:
        raise ValueError(f"a box is [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1 and "
                         f"0 <= y0 <= y1 <= 1, got {list(item)!r:.80}")
    return x0, y0, x1, y1


def grown_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """The box in pixels grown by 10 % of its larger side and clipped to the image, its
    ends excluded as numpy slices (``x1`` may be ``width``: the last column is in it),
    and that side."""
    width, height = size
    x0, y0, x1, y1 = (int(box[0] * width), int(box[1] * height),
                      int(box[2] * width), int(box[3] * height))
    side = max(x1 - x0, y1 - y0)
    grow = 0.1 * side

    def clip(v: float, top: int) -> int:
        return min(max(int(v), 0), top)

    return (clip(x0 - grow, width), clip(y0 - grow, height),
            clip(x1 + grow, width), clip(y1 + grow, height), side)


def blur_boxes(image: Image.Image, boxes: Sequence[Box]) -> Image.Image:
    """``image`` (RGB) with ``boxes`` blurred; ``image`` itself when there is none."""
    if not boxes:
        return image
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    largest = 0
    for box in boxes:
        x0, y0, x1, y1, side = grown_box(box, image.size)
        largest = max(largest, side)
        if x1 > x0 and y1 > y0:  # img2dataset's mask[y0:y1, x0:x1]: end excluded
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    sigma = max(0.1 * largest, 0.5)
    gaussian = ImageFilter.GaussianBlur(sigma)
    soft = mask.filter(gaussian)
    if not soft.getbbox():
        return image
    return Image.composite(image.filter(gaussian), image, soft)

