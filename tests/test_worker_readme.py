"""README.md + docs/*.md name every flag and environment variable of both worker commands."""

from __future__ import annotations

import click
import pytest

from tests.docs_text import docs_text
from worker.cli import download_command, worker_command

SECTION = docs_text()


@pytest.mark.parametrize("command", [worker_command, download_command], ids=lambda c: c.name)
def test_every_option_and_envvar_is_documented(command: click.Command) -> None:
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        assert param.opts[0] in SECTION, param.opts[0]
        assert isinstance(param.envvar, str) and f"`{param.envvar}`" in SECTION, param.envvar
