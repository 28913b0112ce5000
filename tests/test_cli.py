"""The command line: every command answers --help; the shared formats stay light."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from pairfarm.cli import COMMANDS
from tests.conftest import REPO, cli_env, run_cli


def test_top_level_help_lists_every_command() -> None:
    out = run_cli("--help").stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str) -> None:
    out = run_cli(name, "--help").stdout
    assert "Usage: pairfarm" in out and name in out


def test_shared_modules_import_no_heavy_library() -> None:
    code = (
        "import sys, pairfarm.cli, pairfarm.protocol, pairfarm.outcomes, pairfarm.shardformat;"
        "heavy = {'sqlalchemy', 'fastapi', 'trio', 'torch', 'PIL', 'pyarrow', 'httpx'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_readme_commands_table_lists_every_command_with_its_reference() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("\n## Commands\n"):].split("\n## ")[1]
    rows = {row.split("|")[1].strip(): row for row in table.splitlines() if row.startswith("| `")}
    listed = {name for cell in rows for name in re.findall(r"pairfarm ([a-z-]+)", cell)}
    assert listed == set(COMMANDS)
    assert all("](" in row for row in rows.values())


def test_readme_install_table_names_every_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("\n## Install per role\n"):].split("\n## ")[1]
    specs = re.findall(r"pairfarm\[([a-z0-9,-]+)\]", table)
    named = {name for spec in specs for name in spec.split(",")}
    assert set(extras) - {"dev"} - named == set()
    assert named <= set(extras)
