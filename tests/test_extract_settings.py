"""The settings factory and the ingest command line (pure logic)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from extract.dedup import KeyMode
from extract.errors import IngestError, SettingsError
from extract.ingest import IngestCommand
from extract.settings import build_settings

DEFAULTS = dict(sources=["a.wat.gz"], out_dir=Path("out"), workers=None, rows_per_shard=10,
                min_alt_chars=5, language_threshold=0.5, dedup_key="url+alt", bloom_path=None,
                use_bloom=True, bloom_capacity=1000, bloom_fpr=0.01, ingest=False)


def test_defaults_are_filled_in() -> None:
    settings = build_settings(**DEFAULTS)  # type: ignore[arg-type]
    assert settings.workers >= 1
    assert settings.bloom_path == Path("out/dedup.bloom")
    assert settings.file.key_mode is KeyMode.URL_ALT
    assert settings.bloom.key_mode is KeyMode.URL_ALT
    assert settings.ingest is None


def test_no_bloom_and_ingest() -> None:
    settings = build_settings(**{**DEFAULTS, "use_bloom": False, "ingest": True,  # type: ignore[arg-type]
                                 "ingest_args": ("--batch-size", "5000")})
    assert settings.bloom_path is None
    assert settings.ingest == IngestCommand(("--batch-size", "5000"))


@pytest.mark.parametrize(("change", "message"), [
    ({"sources": []}, "at least one WAT"),
    ({"rows_per_shard": 0}, "--shard-rows"),
    ({"min_alt_chars": -1}, "--min-alt-chars"),
    ({"language_threshold": 1.5}, "--language-threshold"),
    ({"bloom_capacity": 0}, "--bloom-capacity"),
    ({"bloom_fpr": 0.0}, "--bloom-fpr"),
    ({"workers": 0}, "--workers"),
])
def test_bad_values_name_their_flag(change: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build_settings(**{**DEFAULTS, **change})  # type: ignore[arg-type]


def test_ingest_argv_names_the_columns_and_passes_extra_args() -> None:
    argv = IngestCommand(("--source", "cc-2024")).argv(Path("/o/run-00000.parquet"))
    assert argv == [sys.executable, "-m", "pairfarm", "ingest", "/o/run-00000.parquet",
                    "--url-col", "url", "--caption-col", "caption", "--language-col", "language",
                    "--source", "cc-2024"]


def test_a_missing_ingest_command_is_a_clear_error() -> None:
    command = IngestCommand(base=(sys.executable, "-m", "pairfarm", "no-such-command"))
    with pytest.raises(IngestError, match="--ingest needs the 'pairfarm ingest' command"):
        command.check_available()


def test_a_failing_ingest_names_the_shard_and_the_exit_status(tmp_path: Path) -> None:
    shard = tmp_path / "run-00000.parquet"
    shard.write_bytes(b"not parquet")
    command = IngestCommand(("--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/none"))
    with pytest.raises(IngestError, match=r"pairfarm ingest run-00000.parquet exited [1-9]"):
        command.run(shard)
