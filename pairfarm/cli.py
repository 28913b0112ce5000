"""The ``pairfarm`` command line.

Each subcommand lives with its component and is imported only when it runs, so that a
worker VM with ``pairfarm[worker]`` installed never imports the coordinator's database
stack, and ``pairfarm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging

import click

#: subcommand name -> "module:attribute" of its click command.
#: Add one line here when a component gains a command.
COMMANDS: dict[str, str] = {
    "up": "localfarm.cli:up",
    "demo": "localfarm.cli:demo",
    "coordinator": "coordinator.cli:coordinator",
    "db": "coordinator.cli:db",
    "extract": "extract.cli:extract_command",
    "ingest": "coordinator.ingest.cli:ingest",
    "token": "coordinator.cli:token",
    "batches": "coordinator.cli:batches",
    "archive": "coordinator.cli:archive_command",
    "postprocess": "gpu_postprocess.command:postprocess",
    "postprocess-shard": "gpu_postprocess.command:postprocess_shard",
    "worker": "worker.cli:worker_command",
    "download": "worker.cli:download_command",
    "export": "export.cli:export_command",
    "index": "knn.command:index_command",
    "search": "search.command:search_command",
    "serve-search": "search.command:serve_search_command",
    "status": "pairfarm.status:status",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            return _load(self._lazy[cmd_name])
        return super().get_command(ctx, cmd_name)


def _load(target: str) -> click.Command:
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = module_name.split(".")[0].replace("gpu_postprocess", "gpu")
        raise click.ClickException(
            f"this command needs the '{extra}' extra: pip install 'pairfarm[{extra}]' ({exc})"
        ) from exc
    command = getattr(module, attr)
    assert isinstance(command, click.Command)
    return command


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="pairfarm")
def cli(verbose: int) -> None:
    """pairfarm: build LAION-style image-text datasets with a farm of download workers."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli(prog_name="pairfarm", auto_envvar_prefix="PAIRFARM")
