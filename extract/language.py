"""The caption's language: ``en``, another ISO 639-1 code, or ``nolang``.

LAION-5B split its candidates three ways: English (laion2B-en), another detected language
(laion2B-multi, with its code) and no confident language (laion1B-nolang); post-processing
uses a different CLIP threshold for English. The label is the detector's most probable
language when its probability reaches the threshold, else ``nolang``.

Detector: py3langid (BSD-3-Clause, maintained fork of langid.py). Its naive Bayes model
(142 languages in 0.4.0; ISO 639-1 codes where one exists, else 639-3) ships inside the
wheel, so nothing is downloaded at run time; it loads in about a second and labels tens of
thousands of short texts per second on one core. With ``norm_probs=True`` its scores are
probabilities in [0, 1], so one threshold means the same for every language.
(lingua-language-detector was measured too: 12 s to load all languages, 1.4 GB per process
and ~2.7k texts/s; see docs/extract.md.)

Resource handling: the model is loaded once per process by ``LanguageLabeller()``, never at
import time.
"""

from __future__ import annotations

from dataclasses import dataclass

NOLANG = "nolang"
ENGLISH = "en"
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class LanguageLabel:
    language: str
    score: float


class LanguageLabeller:
    """Labels texts with py3langid's most probable language, or ``nolang`` below threshold."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.threshold = threshold

    def label(self, text: str) -> LanguageLabel:
        code, probability = self._identifier.classify(text)
        score = float(probability)
        return LanguageLabel(code if score >= self.threshold else NOLANG, score)
