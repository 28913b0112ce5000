"""Scoring maths with hand-built embeddings, and the settings parsers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_postprocess.errors import SettingsError
from gpu_postprocess.models import ModelSpec
from gpu_postprocess.scoring import (
    Thresholds,
    cosine_similarity,
    keep_mask,
    l2_normalize,
    normalize_language,
    similarity_histogram,
    to_fp16_unit,
)
from gpu_postprocess.settings import parse_text_models, parse_thresholds

DEFAULT = Thresholds(by_language={"en": 0.28, "*": 0.26})


def pair_at(cos: float, dim: int = 8, scale_img: float = 1.0,
            scale_txt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Image and text vectors whose cosine is ``cos`` (computed in float64)."""
    img = np.zeros(dim)
    txt = np.zeros(dim)
    img[0] = 1.0
    txt[0], txt[1] = cos, math.sqrt(1 - cos * cos)
    return img[None] * scale_img, txt[None] * scale_txt


@pytest.mark.parametrize(("cos", "lang", "kept"), [
    (0.28, "en", True), (np.nextafter(np.float32(0.28), np.float32(0)), "en", False),
    (0.26, "de", True), (np.nextafter(np.float32(0.26), np.float32(0)), "fr", False),
    (0.27, "en", False), (0.27, "de", True),
])
def test_threshold_is_inclusive_per_language(cos: float, lang: str, kept: bool) -> None:
    img, txt = pair_at(float(cos))
    sim = cosine_similarity(img, txt)
    assert sim[0] == np.float32(cos)
    thr = DEFAULT.for_languages([lang])
    assert bool(keep_mask(sim, thr)[0]) is kept


def test_unnormalised_inputs_give_the_same_similarity() -> None:
    img, txt = pair_at(0.28, scale_img=17.5, scale_txt=0.003)
    assert cosine_similarity(img, txt)[0] == np.float32(0.28)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 512)), rng.standard_normal((50, 512))
    expected = np.sum(l2_normalize(a) * l2_normalize(b), axis=1)
    np.testing.assert_allclose(cosine_similarity(a * 9, b / 7), expected, atol=1e-6)


def test_fp16_round_trip_keeps_unit_norm_and_similarity() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((200, 512)), rng.standard_normal((200, 512))
    a16, b16 = to_fp16_unit(a * 30), to_fp16_unit(b)
    assert a16.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(a16.astype(np.float32), axis=1), 1.0, atol=2e-3)
    sim16 = np.sum(a16.astype(np.float32) * b16.astype(np.float32), axis=1)
    np.testing.assert_allclose(sim16, cosine_similarity(a, b), atol=2e-3)


def test_zero_vector_has_zero_similarity_not_nan() -> None:
    sim = cosine_similarity(np.zeros((1, 4)), np.ones((1, 4)))
    assert sim[0] == 0.0


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_similarity(np.zeros((2, 4)), np.zeros((3, 4)))


@pytest.mark.parametrize(("raw", "norm"), [
    (None, "en"), ("", "en"), ("EN", "en"), ("en-US", "en"), ("pt_BR", "pt"), (" de ", "de"),
])
def test_language_codes_are_normalised(raw: str | None, norm: str) -> None:
    assert normalize_language(raw) == norm


def test_histogram_counts_every_value_once() -> None:
    values = np.array([-1.0, -0.5, 0.0, 0.28, 0.28, 0.99, 1.0, 3.0])
    hist = similarity_histogram(values, bins=4)
    assert hist.edges == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert hist.counts == [1, 1, 3, 3]
    assert sum(hist.counts) == len(values)


def test_parse_thresholds_overrides_defaults() -> None:
    t = parse_thresholds(["de=0.2", "*=0.3", "EN-gb=0.31"])
    assert t.for_language("de") == pytest.approx(0.2)
    assert t.for_language("en") == pytest.approx(0.31)
    assert t.for_language("ja") == pytest.approx(0.3)
    assert parse_thresholds([]).for_language("en") == pytest.approx(0.28)
    assert parse_thresholds([]).for_language("ja") == pytest.approx(0.26)


@pytest.mark.parametrize("bad", ["en", "=0.3", "en=abc", "en=1.5"])
def test_parse_thresholds_rejects_bad_values(bad: str) -> None:
    with pytest.raises(SettingsError):
        parse_thresholds([bad])


def test_parse_text_models() -> None:
    routes = parse_text_models(["*=xlm-roberta-base-ViT-B-32@laion5b_s13b_b90k",
                                "de=local-dir:/m/de"])
    assert routes["*"] == ModelSpec("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k")
    assert routes["de"] == ModelSpec("local-dir:/m/de", None)
