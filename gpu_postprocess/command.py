"""``pairfarm postprocess`` and ``pairfarm postprocess-shard``: the click commands.

Imports only click and the light settings at module level: ``--help`` never loads torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("farm-data") / "postprocessed"


def scoring_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say how shards are scored (shared by both commands)."""
    options = [
        click.option("--model", envvar="PAIRFARM_MODEL", default="ViT-B-32", show_default=True,
                     help="open_clip model name, or local-dir:PATH / hf-hub:ORG/REPO."),
        click.option("--pretrained", envvar="PAIRFARM_PRETRAINED", default="openai",
                     show_default=True,
                     help="open_clip pretrained tag or checkpoint path; 'none' for random "
                          "weights (benchmarks). Ignored for local-dir: / hf-hub: models."),
        click.option("--device", envvar="PAIRFARM_DEVICE", default="auto", show_default=True,
                     help="auto (CUDA if present), cuda, cuda:N or cpu."),
        click.option("--precision", envvar="PAIRFARM_PRECISION", default="auto",
                     type=click.Choice(["auto", "fp32", "amp_fp16", "amp_bf16"]),
                     show_default=True, help="auto: bf16/fp16 autocast on GPU, fp32 on CPU."),
        click.option("--batch-size", envvar="PAIRFARM_MODEL_BATCH_SIZE", default=256, type=int,
                     show_default=True, help="Samples per model call."),
        click.option("--workers", envvar="PAIRFARM_DECODE_WORKERS", default=None, type=int,
                     help="Decode/preprocess processes (default: CPUs - 1, at most 8; "
                          "0 decodes in the main process)."),
        click.option("--decode", envvar="PAIRFARM_DECODE", default="auto",
                     type=click.Choice(["auto", "cpu", "device"]), show_default=True,
                     help="Where JPEGs are decoded and preprocessed: auto (on the device "
                          "when it is a GPU), cpu (Pillow in the workers), device "
                          "(torchvision decode_jpeg on --device)."),
        click.option("--prefetch", envvar="PAIRFARM_PREFETCH", default=2, type=int,
                     show_default=True,
                     help="Batches decoded on the device ahead of the model."),
        click.option("--threshold", "thresholds", envvar="PAIRFARM_THRESHOLDS", multiple=True,
                     metavar="LANG=SIM",
                     help="Similarity threshold per language, '*' for the others "
                          "(defaults en=0.28, *=0.26). Repeatable."),
        click.option("--text-model", "text_models", envvar="PAIRFARM_TEXT_MODELS",
                     multiple=True, metavar="LANG=MODEL[@PRETRAINED]",
                     help="Model that scores a language (e.g. '*=xlm-roberta-base-ViT-B-32"
                          "@laion5b_s13b_b90k'); others use --model. Repeatable."),
        click.option("--nsfw/--no-nsfw", envvar="PAIRFARM_NSFW", default=True,
                     show_default=True, help="Tag punsafe with LAION's NSFW detector."),
        click.option("--watermark", envvar="PAIRFARM_WATERMARK", default="auto",
                     type=click.Choice(["auto", "efficientnet", "clip-probe", "off"]),
                     show_default=True,
                     help="Watermark model; without weights the column stays empty."),
        click.option("--watermark-weights", envvar="PAIRFARM_WATERMARK_WEIGHTS",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Local weights: EfficientNet state dict (.pt) or probe (.npz)."),
        click.option("--watermark-url", envvar="PAIRFARM_WATERMARK_URL",
                     default=None, help="Where to fetch EfficientNet weights (default: "
                                        "LAION's published release); 'none' never fetches."),
        click.option("--cache-dir", envvar="PAIRFARM_CACHE_DIR",
                     type=click.Path(file_okay=False, path_type=Path),
                     default=Path.home() / ".cache" / "pairfarm", show_default=True,
                     help="Where fetched weights are kept."),
        click.option("--out", "out_dir", envvar="PAIRFARM_POSTPROCESS_OUT",
                     type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
                     show_default=True, help="Output folder (filtered shards, parquet, "
                                             "embeddings/)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_settings(kw: dict[str, Any]) -> tuple[Any, Any]:
    """``ScoringSettings`` and ``OutputSettings`` from the command's keyword arguments."""
    from gpu_postprocess.models import ModelSpec
    from gpu_postprocess.settings import (
        DecodeMode,
        OutputSettings,
        ScoringSettings,
        default_workers,
        parse_text_models,
        parse_thresholds,
    )
    from gpu_postprocess.watermark import LAION_RELEASE_URL, WatermarkKind, WatermarkSettings

    pretrained = None if kw["pretrained"] in (None, "", "none") else kw["pretrained"]
    url = kw["watermark_url"] or LAION_RELEASE_URL
    watermark = WatermarkSettings(kind=WatermarkKind(kw["watermark"]),
                                  weights=kw["watermark_weights"],
                                  url=None if url == "none" else url, cache_dir=kw["cache_dir"])
    scoring = ScoringSettings(
        model=ModelSpec(kw["model"], pretrained), text_models=parse_text_models(kw["text_models"]),
        thresholds=parse_thresholds(kw["thresholds"]), device=kw["device"],
        precision=kw["precision"], batch_size=kw["batch_size"],
        workers=default_workers() if kw["workers"] is None else kw["workers"],
        decode=DecodeMode(kw["decode"]), prefetch=kw["prefetch"],
        nsfw=kw["nsfw"], watermark=watermark)
    return scoring, OutputSettings(out_dir=kw["out_dir"])


@contextlib.contextmanager
def click_errors() -> Iterator[None]:
    """The component's and the client's errors as clear one-line CLI errors."""
    from gpu_postprocess.errors import PostprocessError
    from pairfarm.client import ClientError

    try:
        yield
    except (PostprocessError, ClientError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[int, int], Callable[[int], None]]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(),
                  transient=False) as progress:

        def start(batch_id: int, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"batch {batch_id}", total=total)
            return lambda n: progress.advance(task, n)

        yield start


def _sigterm_stops() -> None:
    """SIGTERM (docker stop, systemd) unwinds like Ctrl-C: the leased batch is released."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


@click.command("postprocess")
@click.option("--coordinator", envvar="PAIRFARM_COORDINATOR", required=True,
              help="Coordinator base URL, e.g. http://127.0.0.1:8000.")
@click.option("--token", envvar="PAIRFARM_TOKEN", required=True,
              help="This node's token (role gpu).")
@scoring_options
@click.option("--workdir", envvar="PAIRFARM_WORKDIR", type=click.Path(path_type=Path),
              default=Path(tempfile.gettempdir()) / "pairfarm-postprocess", show_default=True,
              help="Scratch folder for fetched shards.")
@click.option("--max-batches", envvar="PAIRFARM_MAX_BATCHES", type=int, default=None,
              help="Stop after this many batches (default: run until stopped).")
@click.option("--exit-when-idle", envvar="PAIRFARM_EXIT_WHEN_IDLE", is_flag=True,
              help="Stop when the coordinator has no downloaded shard to give.")
@click.option("--poll-interval", envvar="PAIRFARM_POLL_INTERVAL", type=float, default=10.0,
              show_default=True, help="Seconds between lease attempts when idle.")
@click.option("--metrics-port", envvar="PAIRFARM_METRICS_PORT", type=click.IntRange(0, 65535),
              default=0, show_default=True,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: off).")
@click.option("--metrics-host", envvar="PAIRFARM_METRICS_HOST", default="0.0.0.0",
              show_default=True, help="Address the metrics server binds.")
@click.option("--stop-after-failures", envvar="PAIRFARM_STOP_AFTER_FAILURES",
              type=click.IntRange(1), default=3, show_default=True,
              help="Exit after this many batches in a row failed on this machine (its "
                   "output, disk, settings, models or memory; no attempt is charged to them).")
def postprocess(*, coordinator: str, token: str, workdir: Path, max_batches: int | None,
                exit_when_idle: bool, poll_interval: float, metrics_port: int,
                metrics_host: str, stop_after_failures: int, **kw: Any) -> None:
    """Lease downloaded shards from the coordinator, filter them by CLIP similarity, tag
    NSFW and watermarks, write the outputs and complete each batch with its counts.

    A batch that fails on this machine (its output, disk, settings, models or memory) is
    given back without spending an attempt; after --stop-after-failures of them in a row
    the node exits with status 1 and one line naming the cause."""
    with click_errors():
        from gpu_postprocess.metrics import build_metrics, serve_metrics
        from gpu_postprocess.node import Node, node_name
        from gpu_postprocess.pipeline import build_scorer
        from gpu_postprocess.settings import NodeSettings
        from pairfarm.client import CoordinatorClient

        _sigterm_stops()
        node_settings = NodeSettings(coordinator=coordinator, token=token, workdir=workdir,
                                     poll_interval_s=poll_interval, max_batches=max_batches,
                                     exit_when_idle=exit_when_idle,
                                     metrics_port=metrics_port or None,
                                     metrics_host=metrics_host,
                                     stop_after_failures=stop_after_failures)
        scoring, out = build_settings(kw)
        metrics = build_metrics()
        with serve_metrics(metrics, node_settings.metrics_port, metrics_host), \
                CoordinatorClient(coordinator, token) as client:
            reg = client.register(node_name())
            scorer = build_scorer(scoring)
            with progress_bar() as progress:
                node = Node(client, scorer, node_settings, out=out,
                            heartbeat_s=reg.heartbeat_interval_s, progress=progress,
                            metrics=metrics)
                results = node.run()
        for r in results:
            click.echo(json.dumps({"batch_id": r.batch_id, "kept": r.report.kept,
                                   "dropped": r.report.dropped}))


@click.command("postprocess-shard")
@click.argument("tar", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch-id", type=int, default=None,
              help="Shard number for the output names (default: from the tar's name).")
@scoring_options
def postprocess_shard(*, tar: Path, parquet: Path, batch_id: int | None, **kw: Any) -> None:
    """Score one download shard on disk (no coordinator) and write the same outputs."""
    with click_errors():
        from gpu_postprocess.errors import SettingsError
        from gpu_postprocess.node import process_shard
        from gpu_postprocess.pipeline import build_scorer
        from gpu_postprocess.shardio import open_local_shard

        if batch_id is None:
            if not tar.stem.isdigit():
                raise SettingsError(f"give --batch-id: {tar.name} is not named by a number")
            batch_id = int(tar.stem)
        scoring, out = build_settings(kw)
        scorer = build_scorer(scoring)
        shard = open_local_shard(tar, parquet)
        with progress_bar() as progress:
            tick = progress(batch_id, len(shard.ok_rows()))
            written = process_shard(scorer, shard, batch_id, out, tick)
        click.echo(json.dumps({k: written.summary[k] for k in ("kept", "dropped",
                                                                "drop_reasons")}))
