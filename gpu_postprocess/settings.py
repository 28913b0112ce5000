"""Typed settings of the post-processing node, built and validated by factories.

``ScoringSettings`` says how a shard is scored (models, thresholds, tags, batching),
``OutputSettings`` where results go, ``NodeSettings`` how the node talks to the
coordinator and where it serves its metrics. The click command builds them from flags /
environment with ``parse_thresholds`` and ``parse_text_models``; nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from gpu_postprocess.errors import SettingsError
from gpu_postprocess.models import ModelSpec
from gpu_postprocess.scoring import DEFAULT_THRESHOLDS, Thresholds, normalize_language
from gpu_postprocess.watermark import WatermarkSettings


class DecodeMode(StrEnum):
    """Where images are decoded and preprocessed (``--decode``)."""

    AUTO = "auto"  # on the device when it is a GPU and the preprocessing is understood
    CPU = "cpu"  # Pillow + torchvision's PIL transforms in the decode workers
    DEVICE = "device"  # torchvision.io.decode_jpeg + tensor transforms on the model's device


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    model: ModelSpec
    #: language (or ``*``: every language not listed, English excepted) -> the model whose
    #: image and text towers score it; unrouted languages use ``model``
    text_models: dict[str, ModelSpec] = field(default_factory=dict)
    thresholds: Thresholds = field(
        default_factory=lambda: Thresholds(by_language=dict(DEFAULT_THRESHOLDS)))
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    workers: int = 2
    decode: DecodeMode = DecodeMode.AUTO
    #: batches decoded ahead of the model on the device path (each holds its images)
    prefetch: int = 2
    nsfw: bool = True
    watermark: WatermarkSettings = field(default_factory=WatermarkSettings)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SettingsError("--batch-size must be at least 1")
        if self.workers < 0:
            raise SettingsError("--workers must be 0 or more")
        if self.prefetch < 1:
            raise SettingsError("--prefetch must be at least 1")


@dataclass(frozen=True, kw_only=True)
class OutputSettings:
    out_dir: Path


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    coordinator: str
    token: str
    workdir: Path
    poll_interval_s: float = 10.0
    max_batches: int | None = None
    exit_when_idle: bool = False
    #: where ``/metrics`` is served: None is off, 0 any free port (``--metrics-port 0``
    #: means off: the command passes None)
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    #: stop after this many batches in a row failed on this machine (its output, disk,
    #: settings, models or memory) with no batch completed in between
    stop_after_failures: int = 3

    def __post_init__(self) -> None:
        if not self.coordinator.startswith(("http://", "https://")):
            raise SettingsError(f"--coordinator must be an http(s) URL, not {self.coordinator!r}")
        if not self.token:
            raise SettingsError("--token is required (or PAIRFARM_TOKEN)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"--metrics-port must be within 0..65535, not "
                                f"{self.metrics_port}")
        if self.stop_after_failures < 1:
            raise SettingsError(f"--stop-after-failures must be at least 1, not "
                                f"{self.stop_after_failures}")


def _pairs(items: Iterable[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        lang, sep, value = item.partition("=")
        if not sep or not lang or not value:
            raise SettingsError(f"{what} must look like LANG=VALUE, not {item!r}")
        out["*" if lang.strip() == "*" else normalize_language(lang)] = value.strip()
    return out


def parse_thresholds(items: Iterable[str]) -> Thresholds:
    """``["en=0.28", "*=0.26", "de=0.25"]`` over the defaults (0.28 en, 0.26 others)."""
    merged: dict[str, float] = dict(DEFAULT_THRESHOLDS)
    for lang, value in _pairs(items, "--threshold").items():
        try:
            merged[lang] = float(value)
        except ValueError as exc:
            raise SettingsError(f"--threshold {lang}={value}: not a number") from exc
        if not -1.0 <= merged[lang] <= 1.0:
            raise SettingsError(f"--threshold {lang}={value}: outside [-1, 1]")
    return Thresholds(by_language=merged)


def parse_text_models(items: Iterable[str]) -> dict[str, ModelSpec]:
    """``["de=xlm-roberta-base-ViT-B-32@laion5b_s13b_b90k"]`` -> language -> spec."""
    return {lang: ModelSpec.parse(spec) for lang, spec in _pairs(items, "--text-model").items()}


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))
