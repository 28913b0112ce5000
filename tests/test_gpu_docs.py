"""README.md + docs/*.md name every post-processing command, flag and environment variable."""

from __future__ import annotations

import click
import pytest

from gpu_postprocess.command import postprocess, postprocess_shard
from tests.docs_text import docs_text


@pytest.mark.parametrize("command", [postprocess, postprocess_shard], ids=lambda c: c.name)
def test_every_option_and_envvar_is_documented(command: click.Command) -> None:
    doc = docs_text()
    assert f"pairfarm {command.name}" in doc
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        assert any(f"`{opt}" in doc for opt in param.opts), param.opts
        if param.envvar:
            assert f"`{param.envvar}`" in doc, param.envvar
