"""The README's post-processing section names every command, flag and environment variable."""

from __future__ import annotations

import click
import pytest

from gpu_postprocess.command import postprocess, postprocess_shard
from tests.conftest import REPO


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Post-processing")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("command", [postprocess, postprocess_shard], ids=lambda c: c.name)
def test_every_option_and_envvar_is_documented(command: click.Command) -> None:
    doc = section()
    assert f"pairfarm {command.name}" in doc
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        assert any(f"`{opt}" in doc for opt in param.opts), param.opts
        if param.envvar:
            assert f"`{param.envvar}`" in doc, param.envvar
