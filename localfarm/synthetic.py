"""Synthetic captioned images: coloured shapes with matching captions, and unrelated pairs.

Deterministic for a given seed (NumPy generator + Pillow drawing), so that the tiny CLIP
trained by ``tools/train_tiny_clip.py`` and the tests see the same pictures.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "{c} {s} on a plain background",
             "a drawing of a {c} {s}")
UNRELATED = (
    "quarterly tax report for small businesses", "cheap flights to lisbon this weekend",
    "chapter seven of the mystery novel", "how to reset your router password",
    "football league results and standings", "recipe for slow cooked lentil soup",
    "terms and conditions of the loyalty program", "weather forecast for next tuesday",
)
SIZE = 64


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    label: str  # "colour shape" for shapes, "unrelated" for the noise pictures


def shape_image(rng: np.random.Generator, colour: str, shape: str) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(14, 24))
    cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def noise_image(rng: np.random.Generator) -> Image.Image:
    pixels = rng.integers(0, 256, size=(SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def matched(rng: np.random.Generator) -> Sample:
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    caption = str(rng.choice(TEMPLATES)).format(c=colour, s=shape)
    return Sample(shape_image(rng, colour, shape), caption, f"{colour} {shape}")


def unrelated(rng: np.random.Generator) -> Sample:
    return Sample(noise_image(rng), str(rng.choice(UNRELATED)), "unrelated")


def training_sample(rng: np.random.Generator, unrelated_share: float = 0.2) -> Sample:
    return unrelated(rng) if rng.random() < unrelated_share else matched(rng)


def mismatched(rng: np.random.Generator) -> Sample:
    """A shape picture with a caption that does not describe it (an unrelated text,
    or another colour and shape)."""
    good = matched(rng)
    if rng.random() < 0.5:
        return Sample(good.image, str(rng.choice(UNRELATED)), "mismatched")
    colour, shape = good.label.split()
    other_c = str(rng.choice([c for c in COLOURS if c != colour]))
    other_s = str(rng.choice([s for s in SHAPES if s != shape]))
    return Sample(good.image, f"a {other_c} {other_s}", "mismatched")


def evaluation_pairs(seed: int, n: int) -> list[tuple[Sample, bool]]:
    """``n`` matched and ``n`` mismatched pairs, interleaved: (sample, is_match)."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[Sample, bool]] = []
    for _ in range(n):
        pairs.append((matched(rng), True))
        pairs.append((mismatched(rng), False))
    return pairs


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
