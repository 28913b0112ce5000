"""``pairfarm worker`` and ``pairfarm download``: the download worker's commands.

Every option also reads an environment variable (shown in ``--help``), so a worker VM
can be configured with an environment file alone.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import click

from pairfarm.outcomes import Outcome
from pairfarm.shardformat import MAX_SHARD_ROWS
from worker.settings import (
    ENCODE_FORMATS,
    HASHES,
    INCREMENTAL_MODES,
    INPUT_FORMATS,
    LAYOUTS,
)
from worker.settings import INTERPOLATIONS as INTERPOLATION_CHOICES

log = logging.getLogger("pairfarm.worker")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
INPUT_CHOICES = (*INPUT_FORMATS, *(f"{name}.gz" for name in INPUT_FORMATS))


def _opt(*names: str, env: str, **kwargs: Any) -> Decorator:
    return click.option(*names, envvar=f"PAIRFARM_{env}", show_envvar=True,
                        show_default=True, **kwargs)


_PIPELINE_OPTIONS: list[Decorator] = [
    _opt("--output", "-o", env="OUTPUT", default="./shards",
         help="Where shards go: a directory or an fsspec URL (s3://bucket/prefix, ...)."),
    _opt("--concurrency", env="CONCURRENCY", type=click.IntRange(1, 4096), default=128,
         help="Requests in flight per process."),
    _opt("--per-host", env="PER_HOST", type=click.IntRange(1, 1024), default=8,
         help="Requests in flight per host name."),
    _opt("--connect-timeout", env="CONNECT_TIMEOUT", type=click.FloatRange(0.1), default=5.0,
         help="Seconds to open a connection."),
    _opt("--read-timeout", env="READ_TIMEOUT", type=click.FloatRange(0.1), default=10.0,
         help="Seconds without a byte before a read fails."),
    _opt("--deadline", env="DEADLINE", type=click.FloatRange(0.1), default=20.0,
         help="Total seconds per URL, redirects and retries included."),
    _opt("--dns-timeout", env="DNS_TIMEOUT", type=click.FloatRange(0.1), default=5.0,
         help="Seconds per DNS lookup (answers are cached per batch)."),
    _opt("--max-body-mb", env="MAX_BODY_MB", type=click.FloatRange(0.01), default=16.0,
         help="Cap on a body's decoded size, in MiB."),
    _opt("--body-memory-mb", env="BODY_MEMORY_MB", type=click.FloatRange(0.02), default=80.0,
         help="MiB of response bodies held at once, from their first byte until decoded "
              "(at least twice --max-body-mb)."),
    _opt("--decode-memory-mb", env="DECODE_MEMORY_MB", type=click.FloatRange(1), default=224.0,
         help="MiB of pixels being decoded at once; an image needing more is a bomb."),
    _opt("--max-redirects", env="MAX_REDIRECTS", type=click.IntRange(0, 20), default=5,
         help="Redirect hops followed per URL."),
    _opt("--retries", env="RETRIES", type=click.IntRange(0, 10), default=2,
         help="Retries after 429 / 503 (Retry-After honoured)."),
    _opt("--max-retry-after", env="MAX_RETRY_AFTER", type=click.FloatRange(1, 3600),
         default=60.0, help="Longest seconds a host is left alone after its 429 / 503, "
                            "whatever its Retry-After says."),
    _opt("--host-queue-timeout", env="HOST_QUEUE_TIMEOUT", type=click.FloatRange(0.1),
         default=300.0, help="Seconds an URL may wait for a slot of its host (not counted "
                             "in --deadline); then it ends host_busy, never requested."),
    _opt("--disallowed-header-directives", env="DISALLOWED_HEADER_DIRECTIVES",
         default="noai,noimageai,noindex,noimageindex,noml",
         help="X-Robots-Tag directives that opt a response out (opted_out), comma or space "
              "separated (img2dataset's list, and noml; 'none' counts as noindex); '' for "
              "none."),
    _opt("--tdm-reservation/--no-tdm-reservation", env="TDM_RESERVATION", default=True,
         help="Honour the TDM Reservation Protocol: a 'tdm-reservation: 1' header opts a "
              "response out (opted_out)."),
    _opt("--allow-private", env="ALLOW_PRIVATE", is_flag=True, default=False,
         help="Allow loopback, private and CGNAT targets (local farms, tests); "
              "never on cloud VMs."),
    _opt("--allow-cidr", env="ALLOW_CIDR", multiple=True, default=(),
         help="Allow exactly this network (repeatable; env: space separated)."),
    _opt("--image-size", env="IMAGE_SIZE", type=click.IntRange(1), default=256,
         help="Output side length (img2dataset's image_size)."),
    _opt("--resize-mode", env="RESIZE_MODE", default="border",
         type=click.Choice(["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]),
         help="img2dataset's resize modes."),
    _opt("--resize-only-if-bigger", env="RESIZE_ONLY_IF_BIGGER", is_flag=True, default=False,
         help="Never upscale."),
    _opt("--min-body-bytes", env="MIN_BODY_BYTES", type=click.IntRange(0), default=5120,
         help="Bodies with fewer bytes end too_small (LAION's 5 KB rule; 0: no floor, as "
              "img2dataset)."),
    _opt("--min-image-size", env="MIN_IMAGE_SIZE", type=click.IntRange(0), default=0,
         help="Drop images whose shorter side is smaller (size_filtered)."),
    _opt("--max-aspect-ratio", env="MAX_ASPECT_RATIO", type=click.FloatRange(1), default=math.inf,
         help="Drop images with a larger long/short side ratio (size_filtered)."),
    _opt("--encode-format", env="ENCODE_FORMAT", type=click.Choice(ENCODE_FORMATS),
         default="jpg", help="Encoding of the output images (img2dataset's encode_format)."),
    _opt("--quality", env="QUALITY", type=click.IntRange(0, 100), default=None,
         help="img2dataset's encode_quality: JPEG / WebP quality 1..100 (default 95); for "
              "PNG the zlib compression level 0..9 (default 6)."),
    _opt("--skip-reencode", env="SKIP_REENCODE", is_flag=True, default=False,
         help="Keep the downloaded bytes when the image needs no resize, crop, border, "
              "turn or blur and already is --encode-format."),
    _opt("--extract-exif/--no-extract-exif", env="EXTRACT_EXIF", default=True,
         help="An exif column: the EXIF tags as JSON text (img2dataset's extract_exif)."),
    _opt("--compute-hash", env="COMPUTE_HASH", type=click.Choice(HASHES), default="sha256",
         help="Digest of the downloaded bytes written as its own column (sha256 always is)."),
    _opt("--verify-hash", env="VERIFY_HASH", default=None,
         help="Input column holding the expected --compute-hash digest: a body whose digest "
              "differs (or whose cell is empty) ends hash_mismatch (img2dataset's "
              "verify_hash)."),
    _opt("--downscale-interpolation", env="DOWNSCALE_INTERPOLATION", default="area",
         type=click.Choice(INTERPOLATION_CHOICES),
         help="Filter when shrinking (img2dataset's names; area = box averaging)."),
    _opt("--upscale-interpolation", env="UPSCALE_INTERPOLATION", default="lanczos",
         type=click.Choice(INTERPOLATION_CHOICES), help="Filter when enlarging."),
    _opt("--decode-threads", env="DECODE_THREADS", type=click.IntRange(1, 256),
         default=os.cpu_count() or 1, help="Threads that decode and resize."),
    _opt("--robots/--no-robots", env="ROBOTS", default=True,
         help="Obey robots.txt (RFC 9309): an URL its origin's rules disallow for "
              "--user-agent-token ends robots_disallowed, never requested."),
    _opt("--user-agent-token", env="USER_AGENT_TOKEN", default="pairfarm",
         help="Product token first in the User-Agent header, matched against robots.txt "
              "groups and X-Robots-Tag prefixes (img2dataset's name)."),
    _opt("--robots-ttl", env="ROBOTS_TTL", type=click.IntRange(1, 86_400), default=86_400,
         help="Seconds a robots.txt answer is used, by this worker and the farm's others."),
    _opt("--robots-unreachable-ttl", env="ROBOTS_UNREACHABLE_TTL",
         type=click.IntRange(1, 86_400), default=600,
         help="Seconds an origin whose robots.txt answered 5xx / 429, or nothing, stays "
              "disallowed before its robots.txt is fetched again."),
    _opt("--progress/--no-progress", env="PROGRESS", default=True,
         help="Show a progress bar."),
    _opt("--metrics-port", env="METRICS_PORT", type=click.IntRange(0, 65535), default=0,
         help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: off)."),
    _opt("--metrics-host", env="METRICS_HOST", default="0.0.0.0",
         help="Address the metrics server binds."),
]


def pipeline_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_PIPELINE_OPTIONS):
        func = option(func)
    return func


def _pipeline_settings(opts: dict[str, Any]) -> Any:
    from worker.addresses import AddressPolicy, parse_cidrs
    from worker.settings import FetchSettings, ImageSettings, PipelineSettings, ProxySettings

    cidrs = [c for value in opts["allow_cidr"] for c in value.split()]
    directives = opts["disallowed_header_directives"].replace(",", " ").lower().split()
    fetch = FetchSettings(
        concurrency=opts["concurrency"], per_host=opts["per_host"],
        connect_timeout=opts["connect_timeout"], read_timeout=opts["read_timeout"],
        deadline=opts["deadline"], dns_timeout=opts["dns_timeout"],
        max_body_bytes=int(opts["max_body_mb"] * 1024 * 1024),
        body_memory_bytes=int(opts["body_memory_mb"] * 1024 * 1024),
        max_redirects=opts["max_redirects"], max_retries=opts["retries"], **_agent(opts),
        max_retry_after=opts["max_retry_after"], host_queue_timeout=opts["host_queue_timeout"],
        disallowed_directives=tuple(directives), tdm_reservation=opts["tdm_reservation"],
        proxy=ProxySettings.from_environment(os.environ),
        policy=AddressPolicy(allow_private=opts["allow_private"],
                             allow_cidrs=parse_cidrs(cidrs)))
    image = ImageSettings(
        image_size=opts["image_size"], resize_mode=opts["resize_mode"],
        resize_only_if_bigger=opts["resize_only_if_bigger"],
        min_bytes=opts["min_body_bytes"],
        min_image_size=opts["min_image_size"], max_aspect_ratio=opts["max_aspect_ratio"],
        encode_format=opts["encode_format"], quality=opts["quality"],
        downscale_interpolation=opts["downscale_interpolation"],
        upscale_interpolation=opts["upscale_interpolation"],
        skip_reencode=opts["skip_reencode"], extract_exif=opts["extract_exif"],
        compute_hash=opts["compute_hash"], verify_hash=opts["verify_hash"] or None,
        bbox_col=opts.get("bbox_col") or None)
    return PipelineSettings(fetch=fetch, image=image, decode_threads=opts["decode_threads"],
                            decode_memory_bytes=int(opts["decode_memory_mb"] * 1024 * 1024),
                            robots=_robots_settings(opts))


def _agent(opts: dict[str, Any]) -> dict[str, Any]:
    """``--user-agent-token``: the token and the User-Agent it starts."""
    from worker.settings import user_agent_for

    token = opts["user_agent_token"]
    return {"agent_token": token, "user_agent": user_agent_for(token)}


def _robots_settings(opts: dict[str, Any]) -> Any:
    from worker.settings import RobotsSettings

    return RobotsSettings(enabled=opts["robots"], ttl_s=opts["robots_ttl"],
                          unreachable_ttl_s=opts["robots_unreachable_ttl"])


def _metrics_settings(opts: dict[str, Any]) -> Any:
    from worker.settings import MetricsSettings

    return MetricsSettings.from_flag(opts["metrics_port"], opts["metrics_host"])


def _serve_metrics(stack: ExitStack, settings: Any) -> Any:
    """The process's ``WorkerMetrics``, served until ``stack`` closes when a port is set."""
    from worker.metrics import build_metrics, serve_metrics

    metrics = build_metrics()
    port = _settings_or_exit(lambda: stack.enter_context(serve_metrics(metrics, settings)))
    if port is not None:
        log.info("metrics at http://%s:%d/metrics", settings.host, port)
    return metrics


def _settings_or_exit(build: Callable[[], Any]) -> Any:
    from worker.errors import WorkerError

    try:
        return build()
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from exc


def _storage(output: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(output)
    except (ImportError, ValueError) as exc:
        raise click.ClickException(f"cannot use output {output!r}: {exc}") from exc
    return fs, paths[0]


def _network(opts: dict[str, Any], pipeline: Any, shared: Any = None) -> Any:
    """How the pipeline reaches the web; with ``--robots`` a ``RobotsCache`` that lives
    as long as the command, sharing answers through ``shared`` (the coordinator)."""
    from worker.batch import Network
    from worker.resolver import SystemResolver
    from worker.robotstxt import RobotsCache

    robots = (RobotsCache(pipeline.robots, pipeline.fetch.agent_token, shared)
              if pipeline.robots.enabled else None)
    return Network(resolver=SystemResolver(timeout=opts["dns_timeout"]), robots=robots)


def trio_run(func: Callable[..., Any], *args: Any) -> Any:
    import trio

    return trio.run(func, *args)


def _peak_rss_mb() -> float:
    from pairfarm.rss import peak_rss_bytes

    return peak_rss_bytes() / 2**20


@click.command("download")
@click.argument("url_list", nargs=-1, required=True)
@_opt("--input-format", env="INPUT_FORMAT", default=None, type=click.Choice(INPUT_CHOICES),
      help="Format of every input file (default: from each file's name).")
@_opt("--url-col", env="URL_COL", default="url", help="Column holding the image URL.")
@_opt("--caption-col", env="CAPTION_COL", default="caption",
      help="Column holding the caption ('' for none).")
@_opt("--bbox-col", env="BBOX_COL", default=None,
      help="Column holding face boxes to blur: a list of [x0, y0, x1, y1] relative to the "
           "image (img2dataset's bbox_col).")
@_opt("--shard-size", env="SHARD_SIZE", type=click.IntRange(1, MAX_SHARD_ROWS), default=10_000,
      help="Candidates per shard (img2dataset's number_sample_per_shard; at most 1,000,000: "
           "a key is the shard number and a 6-digit row).")
@_opt("--output-format", env="OUTPUT_FORMAT", type=click.Choice(LAYOUTS), default="webdataset",
      help="Layout of the shards (img2dataset's output_format).")
@_opt("--incremental-mode", env="INCREMENTAL_MODE", type=click.Choice(INCREMENTAL_MODES),
      default="incremental",
      help="incremental: skip the shards whose stats json exists, redo the others; "
           "overwrite: remove the earlier run's shards, redo every shard.")
@_opt("--processes", env="PROCESSES", type=click.IntRange(1, 256), default=1,
      help="Processes downloading shards at once (img2dataset's processes_count).")
@pipeline_options
def download_command(url_list: tuple[str, ...], **opts: Any) -> None:
    """Download URL lists into shards, without a coordinator (like img2dataset).

    URL_LIST: files, folders and glob patterns (local or fsspec URLs) of txt, csv, tsv,
    json, jsonl or parquet files, each optionally .gz. Shard N is {N:08d}.parquet and
    _stats.json in --output, with {N:08d}.tar, a {N:08d}/ folder, or the images in the
    parquet (--output-format). A rerun skips the shards already done.
    """
    from worker import download
    from worker.inputs import Columns

    settings = _settings_or_exit(lambda: _pipeline_settings(opts))
    plan = download.DownloadPlan(
        sources=url_list, input_format=opts["input_format"], output=opts["output"],
        columns=Columns(url=opts["url_col"], caption=opts["caption_col"] or None,
                        verify_hash=opts["verify_hash"] or None, bbox=opts["bbox_col"] or None),
        shard_size=opts["shard_size"], layout=opts["output_format"],
        processes=opts["processes"], incremental=opts["incremental_mode"] == "incremental")
    metrics_settings = _settings_or_exit(lambda: _metrics_settings(opts))
    with ExitStack() as stack:
        metrics = _serve_metrics(stack, metrics_settings)
        with _progress(opts["progress"]) as advance:
            totals = _settings_or_exit(lambda: download.run(plan, settings, metrics, advance))
    _print_totals(totals)


def _progress(enabled: bool) -> Any:
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    @contextmanager
    def bar() -> Any:
        columns = ("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, disable=not enabled, transient=False) as progress:
            task = progress.add_task("downloading", total=None)
            yield lambda _sample: progress.advance(task)

    return bar()


def _print_totals(totals: Any) -> None:
    ok = totals.outcomes.get(Outcome.OK.value, 0)
    click.echo(f"{totals.urls} URLs in {totals.seconds:.1f}s: {ok} ok "
               f"({ok / max(totals.seconds, 1e-9):.1f}/s), {totals.shards_written} shards "
               f"written, {totals.shards_skipped} already done; "
               f"peak RSS {_peak_rss_mb():.0f} MB")
    for name, number in sorted(totals.outcomes.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {name:15s} {number}")


@click.command("worker")
@_opt("--coordinator", env="COORDINATOR", required=True,
      help="Base URL of the coordinator, e.g. http://coord:8000.")
@_opt("--token", env="TOKEN", required=True, help="This worker's bearer token.")
@_opt("--name", env="WORKER_NAME", default=socket.gethostname(),
      help="Name shown in the coordinator's worker list.")
@_opt("--max-batch", env="MAX_BATCH", type=click.IntRange(1), default=None,
      help="Lease at most this many candidates at a time (the coordinator caps it).")
@_opt("--idle-poll", env="IDLE_POLL", type=click.FloatRange(0.1), default=10.0,
      help="Seconds before asking again when the coordinator had no batch to lease "
           "(half fixed, half random); doubles while it has none, up to --idle-poll-max.")
@_opt("--idle-poll-max", env="IDLE_POLL_MAX", type=click.FloatRange(0.1), default=60.0,
      help="Longest wait between two leases of an empty queue.")
@_opt("--exit-when-idle", env="EXIT_WHEN_IDLE", is_flag=True, default=False,
      help="Exit when the coordinator has no batch to lease.")
@_opt("--max-batches", env="MAX_BATCHES", type=click.IntRange(1), default=None,
      help="Exit after this many batches.")
@_opt("--drain-timeout", env="DRAIN_TIMEOUT", type=click.FloatRange(0), default=120.0,
      help="After SIGTERM, seconds to finish the batch in hand before releasing it.")
@_opt("--backoff-cap", env="BACKOFF_CAP", type=click.FloatRange(0.1), default=60.0,
      help="Longest wait between retries while the coordinator is unreachable.")
@_opt("--stop-after-failures", env="STOP_AFTER_FAILURES", type=click.IntRange(1), default=3,
      help="Exit after this many batches in a row failed on this machine (its disk, "
           "output or settings; no attempt is charged to them).")
@_opt("--lease-ahead-at", env="LEASE_AHEAD_AT", type=click.IntRange(0), default=256,
      help="Lease the next batch once this many or fewer of the batch in hand's candidates "
           "are unfinished, so that its lease and first requests overlap the tail (at most "
           "2 batches in hand, sharing --concurrency and the memory budgets; 0: off).")
@pipeline_options
def worker_command(**opts: Any) -> None:
    """Lease batches from the coordinator, download them into shards, report them.

    SIGTERM / Ctrl-C once: finish the batch in hand (up to --drain-timeout), then exit
    (at once when no batch is in hand). Twice: release the batch to the coordinator now
    and exit. Exits with status 1 and one line saying why when the token is refused, the
    output cannot be written, or --stop-after-failures batches in a row failed here.
    """
    from worker.settings import RunSettings

    settings = _settings_or_exit(lambda: RunSettings(
        coordinator_url=opts["coordinator"], token=opts["token"], output=opts["output"],
        name=opts["name"], pipeline=_pipeline_settings(opts), max_batch=opts["max_batch"],
        idle_poll_s=opts["idle_poll"], idle_poll_max_s=opts["idle_poll_max"],
        exit_when_idle=opts["exit_when_idle"],
        max_batches=opts["max_batches"], drain_timeout_s=opts["drain_timeout"],
        backoff_cap_s=opts["backoff_cap"], stop_after_failures=opts["stop_after_failures"],
        lease_ahead_at=opts["lease_ahead_at"], metrics=_metrics_settings(opts)))
    with ExitStack() as stack:
        metrics = _serve_metrics(stack, settings.metrics)
        summary = trio_run(_work, settings, opts, metrics)
    click.echo(f"worker done: {summary.batches_completed} batches completed "
               f"({summary.samples} samples), {summary.batches_released} released, "
               f"{summary.batches_lost} lost, {summary.batches_failed} failed; "
               f"idle {summary.idle_fraction:.1%} of the time; peak RSS {_peak_rss_mb():.0f} MB")


async def _work(settings: Any, opts: dict[str, Any], metrics: Any) -> Any:
    from pairfarm.client import AsyncCoordinatorClient
    from worker.robotstxt import CoordinatorRobots
    from worker.runloop import RunLoop, WorkerStopped

    fs, directory = _storage(settings.output)
    async with AsyncCoordinatorClient(settings.coordinator_url, settings.token) as client:
        shared = CoordinatorRobots(client)
        loop = RunLoop(settings, client, fs, directory,
                       network=_network(opts, settings.pipeline, shared),
                       progress=_batch_progress(opts["progress"]), metrics=metrics)
        try:
            return await loop.run()
        except WorkerStopped as exc:
            raise click.ClickException(str(exc)) from exc


def _batch_progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import Progress

    progress = Progress(transient=True)

    def for_lease(lease: Any) -> Callable[[Any], None]:
        progress.start()
        task = progress.add_task(f"batch {lease.batch_id}", total=len(lease.candidates))

        def advance(_sample: Any) -> None:
            progress.advance(task)
            if progress.tasks[task].finished:
                progress.remove_task(task)
                progress.stop()
        return advance

    return for_lease
