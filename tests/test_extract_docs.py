"""README.md + docs/*.md name every flag and environment variable of pairfarm extract."""

from __future__ import annotations

import click

from extract.cli import extract_command
from tests.docs_text import docs_text


def extract_section() -> str:
    return docs_text()


def test_every_flag_and_envvar_is_documented() -> None:
    section = extract_section()
    for param in extract_command.params:
        if not isinstance(param, click.Option):
            continue
        for flag in param.opts:
            assert f"`{flag}" in section, flag
        if param.envvar:
            assert f"`{param.envvar}`" in section, param.envvar


def test_every_output_column_and_drop_reason_is_documented() -> None:
    from extract.links import Drop
    from extract.shards import SCHEMA

    section = extract_section()
    for name in SCHEMA.names:
        assert f"| `{name}` |" in section, name
    for reason in Drop:
        assert f"`{reason.value}`" in section, reason
