"""``pairfarm up`` and ``pairfarm demo``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from localfarm.errors import FarmError
from localfarm.stopping import FarmStopped, Shutdown
from localfarm.up import FarmResult, UpSettings, run_farm

log = logging.getLogger("pairfarm.up")


def _summary(result: FarmResult) -> str:
    s = result.stats
    outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(s.outcomes.items(), key=lambda kv: -kv[1]))
    lines = [
        f"farm finished in {result.seconds:.0f} s: {s.candidates_total:,} candidates, "
        f"batches {dict(sorted(s.batches.items()))}",
        f"outcomes: {outcomes or 'none'}",
        f"shards:   {result.out / 'shards'}",
    ]
    if s.kept or s.dropped:
        lines.append(f"filtered: kept {s.kept:,}, dropped {s.dropped:,} -> "
                     f"{result.out / 'postprocessed'}")
    if result.restarts:
        lines.append(f"restarts: {result.restarts} (see {result.out / 'logs'})")
    if result.shutdown.killed:
        lines.append(f"killed:   {', '.join(result.shutdown.killed)} (did not stop in time)")
    return "\n".join(lines)


def _batches(n: int) -> str:
    return f"{n} batch{'es' if n != 1 else ''}"


def stop_report(stop: Shutdown, lease_ttl_s: float) -> str:
    """What became of the batches in hand when the farm was stopped: only what is known."""
    if stop.in_hand is None or stop.still_leased is None:
        fate = (f"what became of the batches in hand is unknown ({stop.stats_error}); any "
                f"still leased is leased again when its lease expires ({lease_ttl_s:.0f} s)")
    else:
        done = (f"{stop.finished} finished, {stop.released} released"
                + (f", {stop.failed} failed" if stop.failed else ""))
        fate = (f"every batch in hand was finished or released ({done})" if stop.accounted
                else f"{_batches(stop.in_hand)} in hand: {done}; {stop.still_leased} still "
                     f"leased, leased again when the lease expires ({lease_ttl_s:.0f} s)")
    killed = f"; killed (did not stop in time): {', '.join(stop.killed)}" if stop.killed else ""
    return f"{fate}{killed}"


def run_and_report(settings: UpSettings) -> FarmResult:
    try:
        result = run_farm(settings)
    except FarmStopped as exc:
        raise click.ClickException(
            f"{exc}; {stop_report(exc.shutdown, settings.lease_ttl_s)}. "
            f"Run the same command again to resume ({settings.out}).") from None
    except KeyboardInterrupt:
        raise click.ClickException(
            f"stopped before the farm started. Run the same command again to resume "
            f"({settings.out}).") from None
    except FarmError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(_summary(result))
    return result


@click.command("up")
@click.option("--input", "inputs", multiple=True, type=click.Path(exists=True, dir_okay=False,
              path_type=Path), envvar="PAIRFARM_INPUT",
              help="Candidate file(s) to ingest (parquet/csv/tsv/jsonl, .gz too). Repeatable; "
                   "optional on a rerun.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Download worker processes.")
@click.option("--postprocess/--no-postprocess", default=False, show_default=True,
              help="Also run a post-processing process (CLIP filtering, tags, embeddings).")
@click.option("--out", default=Path("farm-data"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), envvar="PAIRFARM_OUT",
              help="Farm directory: database, shards, post-processed output, logs.")
@click.option("--database-url", envvar="DATABASE_URL", default=None, metavar="URL",
              help="Use this PostgreSQL instead of an embedded one in OUT/pg.")
@click.option("--port", default=8600, show_default=True, type=int,
              help="Coordinator port on 127.0.0.1 (0: any free port; kept across reruns).")
@click.option("--batch-size", default=None, type=click.IntRange(1, 1_000_000),
              envvar="PAIRFARM_UP_BATCH_SIZE",
              help="Candidates per download batch, honoured as given. Default: sized to the "
                   "candidates waiting and --workers (about 4 batches per worker, within "
                   "100..10000).")
@click.option("--lease-ttl", default=120.0, show_default=True, type=click.FloatRange(1),
              help="Seconds a lease lasts without a heartbeat (a killed worker's batch is "
                   "leased again after this).")
@click.option("--drain-timeout", "drain_timeout_s", default=60.0, show_default=True,
              type=click.FloatRange(0), envvar="PAIRFARM_UP_DRAIN_TIMEOUT",
              help="On Ctrl-C / SIGTERM: seconds the workers get to finish the batch in hand "
                   "before they are told to release it (a second Ctrl-C: release now).")
@click.option("--url-retries", default=0, show_default=True, type=click.IntRange(0, 20),
              envvar="PAIRFARM_UP_URL_RETRIES",
              help="Times a URL whose outcome was transient (timeout, connect, 5xx, 429, "
                   "host_busy) is tried again in a later batch; the run waits for them.")
@click.option("--url-retry-delay", "url_retry_delay_s", default=60.0, show_default=True,
              type=click.FloatRange(0), envvar="PAIRFARM_UP_URL_RETRY_DELAY",
              help="Seconds before a URL's first retry (each next one waits 4 times longer).")
@click.option("--url-col", default="url", show_default=True, help="Input URL column.")
@click.option("--caption-col", default="caption", show_default=True,
              help="Input caption column.")
@click.option("--worker-arg", "worker_args", multiple=True, metavar="ARG",
              help="Extra argument for every `pairfarm worker` (repeatable), e.g. "
                   "--worker-arg=--image-size=384.")
@click.option("--postprocess-arg", "postprocess_args", multiple=True, metavar="ARG",
              help="Extra argument for `pairfarm postprocess` (repeatable), e.g. "
                   "--postprocess-arg=--device=cuda.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars.")
def up(**options: Any) -> None:
    """Run a whole farm on this machine until every candidate has its outcome.

    Starts an embedded PostgreSQL (or uses DATABASE_URL), ingests --input, then runs the
    coordinator, N download workers and, with --postprocess, a post-processing process,
    restarting any that dies. Ctrl-C (or SIGTERM) stops the workers first (each finishes
    or releases its batch), then the coordinator and the database, and says what became of
    the batches in hand; running the same command again resumes where it stopped, with no
    duplicate samples. A second `up` on the same --out is refused.
    """
    run_and_report(up_settings(**options))


def up_settings(*, inputs: tuple[Path, ...], url_col: str, caption_col: str, lease_ttl: float,
                **rest: Any) -> UpSettings:
    return UpSettings(inputs=inputs, lease_ttl_s=lease_ttl,
                      ingest_args=("--url-col", url_col, "--caption-col", caption_col), **rest)


@click.command("demo")
@click.option("--out", default=Path("farm-demo"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the demo farm keeps its database, shards and output.")
@click.option("--count", default=2000, show_default=True, type=click.IntRange(1),
              help="Synthetic candidates to make.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Download worker processes.")
@click.option("--batch-size", default=250, show_default=True, type=click.IntRange(1),
              help="Candidates per batch.")
@click.option("--port", default=0, show_default=True, type=int,
              help="Coordinator port on 127.0.0.1 (0: any free port).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the synthetic data and of the server's behaviour.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars.")
def demo(*, out: Path, count: int, workers: int, batch_size: int, port: int, seed: int,
         progress: bool) -> None:
    """Run the whole farm offline on synthetic data: the first command to try.

    Serves COUNT synthetic captioned pictures from a local server with a realistic mix
    of trouble (latency, 404/500, resets, opt-outs, decompression bombs, HTML posing as
    JPEG, tiny images), runs `pairfarm up --postprocess` against it with the tiny CLIP
    model shipped for the demo, and checks every URL's outcome against the plan.
    """
    from localfarm.demo import check_dataset, demo_settings, report, write_candidates
    from localfarm.demo_server import DemoPlan, DemoServer

    server = DemoServer(DemoPlan(seed)).start()
    try:
        candidates = write_candidates(server, count, out / "demo-candidates.parquet")
        settings = demo_settings(candidates, out, workers=workers, batch_size=batch_size,
                                 port=port, progress=progress)
        result = run_and_report(settings)
    finally:
        server.stop()
    check = check_dataset(out)
    click.echo(report(result, check, count))
    if check.mismatched or check.urls != count:
        raise click.ClickException("the dataset does not match the demo's plan (see above)")
