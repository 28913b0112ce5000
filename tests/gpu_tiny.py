"""The tiny CLIP committed in localfarm/demo_model (trained by tools/train_tiny_clip.py)."""

from __future__ import annotations

import json
from pathlib import Path

from localfarm import synthetic
from tests.conftest import REPO
from tests.gpu_shards import Row

TINY_DIR = REPO / "localfarm" / "demo_model"
TINY_MODEL = f"local-dir:{TINY_DIR}"


def gap() -> dict[str, float]:
    data: dict[str, float] = json.loads((TINY_DIR / "pairfarm_gap.json").read_text())
    return data


def evaluation_rows(languages: tuple[str, ...] = ("en",)) -> tuple[list[Row], list[bool]]:
    """The trainer's evaluation pairs as shard rows, and which of them match."""
    g = gap()
    pairs = synthetic.evaluation_pairs(int(g["eval_seed"]), int(g["eval_pairs"]))
    rows = [Row(caption=s.caption, image=synthetic.jpeg_bytes(s.image),
                language=languages[i % len(languages)]) for i, (s, _) in enumerate(pairs)]
    return rows, [m for _, m in pairs]


def tiny_path() -> Path:
    return TINY_DIR
