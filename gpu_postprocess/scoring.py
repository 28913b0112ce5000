"""Scoring maths: L2 normalisation, cosine similarity, the keep/drop rule, histograms.

Pure NumPy so that the rule is testable without torch. A sample is kept when the
cosine similarity of its image and text embeddings is at least the threshold of its
language (``>=``: a similarity exactly at the threshold is kept, as in LAION's filter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]

#: Thresholds LAION-5B used: English with ViT-B/32, every other language with a
#: multilingual text tower.
DEFAULT_THRESHOLDS: dict[str, float] = {"en": 0.28, "*": 0.26}
HISTOGRAM_BINS = 40
HISTOGRAM_RANGE = (-1.0, 1.0)


class DropReason(StrEnum):
    KEPT = ""  # not dropped
    LOW_SIMILARITY = "low_similarity"
    NOT_DOWNLOADED = "not_downloaded"  # the download failed (outcome other than ok)
    DECODE_ERROR = "decode_error"  # the image in the shard could not be decoded


def l2_normalize(x: FloatArray, eps: float = 1e-12) -> npt.NDArray[np.float32]:
    """Rows of ``x`` scaled to unit L2 norm, in float32 (a zero row stays zero)."""
    x32 = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x32, axis=-1, keepdims=True)
    return x32 / np.maximum(norms, eps)


def cosine_similarity(image: FloatArray, text: FloatArray) -> npt.NDArray[np.float32]:
    """Row-wise cosine similarity of two (N, D) arrays, any scale, any float dtype."""
    if image.shape != text.shape:
        raise ValueError(f"embedding shapes differ: {image.shape} vs {text.shape}")
    a = l2_normalize(np.asarray(image, dtype=np.float64)).astype(np.float64)
    b = l2_normalize(np.asarray(text, dtype=np.float64)).astype(np.float64)
    return np.einsum("nd,nd->n", a, b).astype(np.float32)


def to_fp16_unit(x: FloatArray) -> npt.NDArray[np.float16]:
    """L2-normalised rows stored as float16 (clip-retrieval's embedding format)."""
    return l2_normalize(x).astype(np.float16)


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Similarity threshold per language; ``"*"`` is the default for any other language."""

    by_language: Mapping[str, float]

    def __post_init__(self) -> None:
        if "*" not in self.by_language:
            raise ValueError("thresholds need a default entry '*'")

    def for_language(self, language: str | None) -> float:
        key = normalize_language(language)
        return float(self.by_language.get(key, self.by_language["*"]))

    def for_languages(self, languages: Sequence[str | None]) -> npt.NDArray[np.float32]:
        return np.array([self.for_language(lang) for lang in languages], dtype=np.float32)


def normalize_language(language: str | None) -> str:
    """``"EN-us"`` -> ``"en"``; missing -> ``"en"`` (LAION-2B-en's captions default)."""
    if not language:
        return "en"
    return language.strip().lower().replace("_", "-").split("-")[0] or "en"


def keep_mask(similarity: FloatArray, thresholds: FloatArray) -> npt.NDArray[np.bool_]:
    """True where ``similarity >= threshold`` (compared in float32, as both are stored)."""
    sim = np.asarray(similarity, dtype=np.float32)
    return sim >= np.asarray(thresholds, dtype=np.float32)


@dataclass(frozen=True)
class Histogram:
    edges: list[float]
    counts: list[int]


def similarity_histogram(similarity: FloatArray, bins: int = HISTOGRAM_BINS) -> Histogram:
    """Counts of ``similarity`` in ``bins`` equal bins over [-1, 1] (values clipped in)."""
    values = np.clip(np.asarray(similarity, dtype=np.float64), *HISTOGRAM_RANGE)
    counts, edges = np.histogram(values, bins=bins, range=HISTOGRAM_RANGE)
    return Histogram(edges=[round(float(e), 6) for e in edges], counts=[int(c) for c in counts])
