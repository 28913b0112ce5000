"""``pairfarm demo``: the whole farm, offline, on synthetic data, in a few minutes.

1. ``DemoPlan`` makes N candidates (URL + caption + the kind of trouble each URL has) and
   writes them to ``OUT/demo-candidates.parquet``; the ``demo_kind`` column rides along
   as an extra column into every shard's parquet.
2. ``DemoServer`` serves them on 127.0.0.1-8.
3. ``pairfarm up --postprocess`` runs the farm against it, the workers allowed to reach
   loopback (``--allow-cidr 127.0.0.0/8``; the SSRF guard stays on for everything else),
   post-processing with the tiny CLIP committed in ``localfarm/demo_model`` at the
   threshold recorded with it.
4. ``check_dataset`` reads the shards back and compares every URL's outcome with what the
   server was told to do.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from localfarm.demo_server import EXPECTED, DemoServer
from localfarm.up import FarmResult, UpSettings
from pairfarm.shardformat import outcome_of

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def demo_threshold() -> float:
    gap = json.loads((DEMO_MODEL / "pairfarm_gap.json").read_text())
    return float(gap["threshold"])


def write_candidates(server: DemoServer, count: int, path: Path) -> Path:
    items = [server.plan.item(n) for n in range(count)]
    table = pa.table({
        "url": [server.url(i.n) for i in items],
        "caption": [i.caption for i in items],
        "language": ["en"] * count,
        "demo_kind": [i.kind for i in items],
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def demo_settings(candidates: Path, out: Path, *, workers: int, batch_size: int,
                  port: int, progress: bool) -> UpSettings:
    threshold = demo_threshold()
    return UpSettings(
        inputs=(candidates,), out=out, workers=workers, postprocess=True, port=port,
        batch_size=batch_size, lease_ttl_s=30.0, progress=progress,
        worker_args=("--allow-cidr", "127.0.0.0/8", "--deadline", "10"),
        postprocess_args=(
            "--model", f"local-dir:{DEMO_MODEL}", "--device", "cpu", "--workers", "0",
            "--batch-size", "64", "--threshold", f"en={threshold}",
            "--threshold", f"*={threshold}", "--no-nsfw", "--watermark", "off"),
    )


@dataclass
class DemoCheck:
    rows: int
    urls: int
    mismatched: list[tuple[str, str, str]]  # (url, kind, status) that disagree
    by_kind: dict[str, Counter[str]]


def shard_rows(out: Path) -> pa.Table:
    files = sorted((out / "shards").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["url", "status", "error_class",
                                                         "demo_kind"])
                             for f in files])


def check_dataset(out: Path) -> DemoCheck:
    """Every URL's recorded outcome against the server's plan."""
    rows = shard_rows(out).to_pylist()
    by_kind: dict[str, Counter[str]] = {}
    wrong = []
    for row in rows:
        outcome = outcome_of(row["status"], row["error_class"])
        by_kind.setdefault(row["demo_kind"], Counter())[outcome.value] += 1
        if outcome is not EXPECTED[row["demo_kind"]]:
            wrong.append((row["url"], row["demo_kind"], outcome.value))
    return DemoCheck(rows=len(rows), urls=len({r["url"] for r in rows}), mismatched=wrong,
                     by_kind=by_kind)


def report(result: FarmResult, check: DemoCheck, count: int) -> str:
    lines = [f"demo: {count} candidates -> {check.rows} shard rows, {check.urls} distinct URLs",
             "outcome by what the server did:"]
    for kind, counts in sorted(check.by_kind.items()):
        lines.append(f"  {kind:<10} {dict(counts)}")
    if check.mismatched:
        lines.append(f"{len(check.mismatched)} URLs ended differently from the plan, e.g. "
                     f"{check.mismatched[:3]}")
    lines += [f"dataset:      {result.out / 'shards'} (webdataset tars, parquet, stats json)",
              f"filtered:     {result.out / 'postprocessed'}",
              f"dashboard:    {result.dashboard} (while a farm runs)"]
    return "\n".join(lines)
