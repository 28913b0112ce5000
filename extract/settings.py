"""The typed settings of a ``pairfarm extract`` run, built and validated in one factory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from extract.dedup import BloomParams, KeyMode
from extract.errors import SettingsError
from extract.fileworker import FileSettings
from extract.ingest import IngestCommand
from extract.sources import HttpPolicy

DEFAULT_ROWS_PER_SHARD = 1_000_000
BLOOM_FILE_NAME = "dedup.bloom"


@dataclass(frozen=True, slots=True)
class ExtractSettings:
    sources: tuple[str, ...]
    out_dir: Path
    workers: int
    rows_per_shard: int
    file: FileSettings
    bloom_path: Path | None
    bloom: BloomParams
    ingest: IngestCommand | None


def build_settings(*, sources: list[str], out_dir: Path, workers: int | None,
                   rows_per_shard: int, min_alt_chars: int, language_threshold: float,
                   dedup_key: str, bloom_path: Path | None, use_bloom: bool,
                   bloom_capacity: int, bloom_fpr: float, ingest: bool,
                   ingest_args: tuple[str, ...] = (), http_timeout: float = 60.0,
                   http_retries: int = 3) -> ExtractSettings:
    """Validate the flags; a bad value raises ``SettingsError`` naming its flag."""
    _require(bool(sources), "give at least one WAT file or URL")
    _require(rows_per_shard > 0, "--shard-rows must be positive")
    _require(min_alt_chars >= 0, "--min-alt-chars must be 0 or more")
    _require(0.0 <= language_threshold <= 1.0, "--language-threshold must be in [0, 1]")
    _require(bloom_capacity > 0, "--bloom-capacity must be positive")
    _require(0.0 < bloom_fpr < 1.0, "--bloom-fpr must be in (0, 1)")
    _require(http_timeout > 0, "--http-timeout must be positive")
    _require(http_retries >= 0, "--http-retries must be 0 or more")
    _require(workers is None or workers > 0, "--workers must be positive")
    key_mode = KeyMode(dedup_key)
    return ExtractSettings(
        sources=tuple(sources),
        out_dir=out_dir,
        workers=workers or _cores(),
        rows_per_shard=rows_per_shard,
        file=FileSettings(min_alt_chars, language_threshold, key_mode,
                          HttpPolicy(timeout=http_timeout, retries=http_retries)),
        bloom_path=(bloom_path or out_dir / BLOOM_FILE_NAME) if use_bloom else None,
        bloom=BloomParams(bloom_capacity, bloom_fpr, key_mode),
        ingest=IngestCommand(tuple(ingest_args)) if ingest else None,
    )


def _cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)
