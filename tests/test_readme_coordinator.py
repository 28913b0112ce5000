"""README.md + docs/*.md document every coordinator command, flag and environment variable."""

from __future__ import annotations

import click
import pytest

from pairfarm.cli import COMMANDS, _load
from tests.docs_text import docs_text

COORDINATOR_COMMANDS = [n for n, target in COMMANDS.items() if target.startswith("coordinator")]


def _commands(name: str) -> list[tuple[str, click.Command]]:
    command = _load(COMMANDS[name])
    if isinstance(command, click.Group):
        return [(f"{name} {sub}", c) for sub, c in command.commands.items()]
    return [(name, command)]


@pytest.mark.parametrize("name", COORDINATOR_COMMANDS)
def test_readme_names_every_command_flag_and_envvar(name: str) -> None:
    readme = docs_text()
    for full_name, command in _commands(name):
        assert f"pairfarm {full_name}" in readme, full_name
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            flag = max(param.opts, key=len)
            assert flag in readme, f"{full_name} {flag}"
            envvars = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
            for env in envvars:
                assert env in readme, f"{full_name} {flag}: {env}"
