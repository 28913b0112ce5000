"""The language labeller: en / another code / nolang below the threshold."""

from __future__ import annotations

import pytest

from extract.language import NOLANG, LanguageLabeller


@pytest.fixture(scope="module")
def labeller() -> LanguageLabeller:
    return LanguageLabeller(threshold=0.5)


@pytest.mark.parametrize(("text", "language"), [
    ("A red car parked on a quiet street at night", "en"),
    ("Ein rotes Auto parkt nachts in einer ruhigen Straße", "de"),
    ("Une voiture rouge garée dans une rue calme la nuit", "fr"),
    ("Un coche rojo aparcado en una calle tranquila de noche", "es"),
    ("赤い車が夜の静かな通りに駐車している", "ja"),
])
def test_confident_captions_get_their_language(labeller: LanguageLabeller, text: str,
                                               language: str) -> None:
    label = labeller.label(text)
    assert label.language == language
    assert label.score >= 0.5


@pytest.mark.parametrize("text", ["IMG_2031.jpg", "DSC 0042 (3)", "click here"])
def test_unconfident_captions_are_nolang(labeller: LanguageLabeller, text: str) -> None:
    label = labeller.label(text)
    assert label.language == NOLANG
    assert 0.0 <= label.score < 0.5


def test_threshold_zero_never_says_nolang() -> None:
    assert LanguageLabeller(threshold=0.0).label("IMG_2031.jpg").language != NOLANG
