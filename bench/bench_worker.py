"""Worker throughput per core and peak RSS, against img2dataset on the same URL list.

``python -m bench.bench_worker --urls 3000`` starts ``bench.image_server`` (16 loopback
hosts, first byte after 50-300 ms, JPEGs of 20-400 KB / 200-2000 px, 25 % failures),
writes one parquet URL list, then runs, one after the other against the same server:

- ``pairfarm download`` (this repository, the worker's pipeline without a coordinator);
- ``img2dataset`` from PyPI, in its own virtual environment (``--i2d``);

with the same resize settings (256 px, ``border``, JPEG quality 95, webdataset output).

``--farm N`` also runs ``pairfarm up --workers N`` (embedded PostgreSQL, coordinator, N
``pairfarm worker``) on the same list twice, with lease-ahead (the default) and with
``--lease-ahead-at 0`` (one batch at a time), and prints each worker's idle fraction
(share of its time with no candidate in flight, from its ``worker done`` line).
For each it measures CPU seconds (user + system of the whole process tree, from
``wait4``, plus, for ``up``, its PostgreSQL server's, which ``pg_ctl`` leaves outside the
tree: ``bench.processes``), wall seconds, successes (from the stats json files), and
peak RSS (the sum over the process tree, sampled every 50 ms). Images/s per core = successes / CPU
seconds. It also prints the decode+resize ceiling (``bench.bench_decode``), each
pairfarm run's images/s and CPU per image against img2dataset's, and the images
img2dataset saved that each pairfarm run did not, counted by pairfarm's outcome (a named
rule such as ``too_small`` or ``robots_disallowed``, or ``missing``).

Issue 12's comparison (real-web latency mix, 2 workers against 2 img2dataset processes,
5,000-URL batches)::

    python -m bench.bench_worker --urls 10000 --hosts 1000 --web real \
        --i2d-processes 2 --i2d-shard-size 5000 --farm 2 --farm-batch-size 5000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.bench_decode import ceiling
from bench.image_server import host_address, image_pool
from bench.options import server_arguments
from bench.processes import PostmasterCpu
from worker.settings import ImageSettings

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    name: str
    wall_s: float
    cpu_s: float
    successes: int
    count: int
    peak_rss_mb: float

    @property
    def per_core(self) -> float:
        return self.successes / self.cpu_s

    def line(self) -> str:
        return (f"{self.name:12s} {self.count:6d} {self.successes:6d} {self.wall_s:8.1f} "
                f"{self.cpu_s:8.1f} {self.successes / self.wall_s:9.1f} {self.per_core:9.1f} "
                f"{self.peak_rss_mb:9.0f}")


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.wait(0.05):
            self.peak = max(self.peak, _tree_rss(root))


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return 0
    return total


def measure(name: str, argv: list[str], env: dict[str, str],
            log: Path, pg_data: Path | None = None) -> tuple[float, float, float]:
    """(wall s, CPU s of the tree, peak summed RSS MB) of ``argv``; with ``pg_data``, the
    CPU of the PostgreSQL server the command runs there is added (``pg_ctl`` leaves it
    outside the tree: ``bench.processes``)."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = RssSampler(proc.pid)
        sampler.start()
        server = PostmasterCpu(pg_data) if pg_data is not None else None
        if server is not None:
            server.start()
        _, status, usage = os.wait4(proc.pid, 0)
        for thread in (sampler, server):
            if thread is not None:
                thread.done.set()
                thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    pg_cpu = server.seconds if server is not None else 0.0
    return wall, usage.ru_utime + usage.ru_stime + pg_cpu, sampler.peak / 1024 / 1024


def successes(directory: Path) -> tuple[int, int]:
    ok = count = 0
    for stats in directory.glob("*_stats.json"):
        data = json.loads(stats.read_text())
        ok += data["successes"]
        count += data["count"]
    return ok, count


def saved_outcomes(directory: Path) -> dict[str, str]:
    """URL -> outcome of every row in a tool's output parquets: ``ok`` for a saved image,
    else pairfarm's ``error_class`` or img2dataset's ``error_message``."""
    found: dict[str, str] = {}
    for path in directory.rglob("*.parquet"):
        if path.name.startswith("."):
            continue
        for row in pq.read_table(path).to_pylist():
            if row.get("status") == "success":
                found[row["url"]] = "ok"
            else:
                found[row["url"]] = str(row.get("error_class") or row.get("error_message"))
    return found


def lost_images(i2d_out: Path, ours: Path) -> Counter[str]:
    """Images img2dataset saved and pairfarm did not, counted by pairfarm's outcome."""
    theirs, mine = saved_outcomes(i2d_out), saved_outcomes(ours)
    return Counter(mine.get(url, "missing") for url, kind in theirs.items()
                   if kind == "ok" and mine.get(url) != "ok")


def start_server(hosts: int, pool_dir: Path,
                 web: str = "uniform") -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen([sys.executable, "-m", "bench.image_server", "--hosts", str(hosts),
                               "--pool-dir", str(pool_dir.resolve()), "--web", web],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("READY"):
        server.kill()
        sys.exit(f"image server did not start: {line!r}")
    return server, int(line.split()[1])


def url_hosts(count: int, hosts: int, web: str = "uniform") -> list[int]:
    """The host index of each of ``count`` URLs: round robin, or (``real``) drawn from a
    Zipf law of exponent 1 over ``hosts`` ranks with a fixed seed."""
    if web == "uniform":
        return [n % hosts for n in range(count)]
    weights = [1 / (rank + 1) for rank in range(hosts)]
    return random.Random(0).choices(range(hosts), weights=weights, k=count)


def url_list(path: Path, count: int, hosts: int, port: int, web: str = "uniform") -> None:
    urls = [f"http://{host_address(h)}:{port}/img/{n}.jpg"
            for n, h in enumerate(url_hosts(count, hosts, web))]
    pq.write_table(pa.table({"url": urls, "caption": [f"image {n}" for n in range(count)]}),
                   path)


def pairfarm_argv(listing: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "pairfarm", "download", str(listing), "-o", str(out),
            "--allow-cidr", "127.0.0.0/8", "--image-size", "256", "--resize-mode", "border",
            "--quality", "95", "--read-timeout", "10", "--concurrency", str(args.concurrency),
            "--per-host", str(args.per_host), "--shard-size", "10000", "--no-progress",
            "--min-body-bytes", str(args.min_body_bytes)]


def up_argv(listing: Path, out: Path, args: argparse.Namespace,
            lease_ahead_at: int | None) -> list[str]:
    worker = ["--allow-cidr=127.0.0.0/8", "--image-size=256", "--resize-mode=border",
              "--quality=95", "--read-timeout=10", f"--concurrency={args.concurrency}",
              f"--per-host={args.per_host}", f"--min-body-bytes={args.min_body_bytes}"]
    if lease_ahead_at is not None:
        worker.append(f"--lease-ahead-at={lease_ahead_at}")
    size = ["--batch-size", str(args.farm_batch_size)] if args.farm_batch_size else []
    return [sys.executable, "-m", "pairfarm", "up", "--input", str(listing), "--out", str(out),
            "--workers", str(args.farm), "--port", "0", "--no-progress", *size,
            *(f"--worker-arg={a}" for a in worker)]


IDLE = re.compile(r"idle ([0-9.]+)% of the time")


def idle_fractions(logs: Path) -> list[float]:
    """Each worker's idle share from its last ``worker done`` line."""
    found = []
    for log in sorted(logs.glob("worker-*.log")):
        shares = IDLE.findall(log.read_text(errors="replace"))
        if shares:
            found.append(float(shares[-1]) / 100)
    return found


def farm_runs(listing: Path, work: Path, env: dict[str, str],
              args: argparse.Namespace) -> list[tuple[Run, list[float]]]:
    runs = []
    for name, ahead in (("up", None), ("up-no-ahead", 0)):
        out = work / name
        wall, cpu, rss = measure(name, up_argv(listing, out, args, ahead), env,
                                 work / f"{name}.log", pg_data=out / "pg")
        ok, count = successes(out / "shards")
        runs.append((Run(name, wall, cpu, ok, count, rss), idle_fractions(out / "logs")))
    return runs


def i2d_argv(listing: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [str(args.i2d), "--url_list", str(listing), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
            "--output_folder", str(out), "--image_size", "256", "--resize_mode", "border",
            "--encode_quality", "95", "--timeout", "10", "--retries", "0",
            "--processes_count", str(args.i2d_processes), "--thread_count",
            str(args.concurrency), "--number_sample_per_shard", str(args.i2d_shard_size),
            "--enable_wandb", "False", "--distributor", "multiprocessing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(parser)
    parser.add_argument("--i2d", type=Path, default=Path(".venv-i2d/bin/img2dataset"))
    parser.add_argument("--i2d-processes", type=int, default=1)
    parser.add_argument("--per-host", type=int, default=16,
                        help="pairfarm's requests in flight per host (img2dataset has no "
                             "such limit)")
    parser.add_argument("--min-body-bytes", type=int, default=5120,
                        help="pairfarm's --min-body-bytes (5120: LAION's 5 KB rule, "
                             "pairfarm's default; 0: none, as img2dataset)")
    parser.add_argument("--i2d-shard-size", type=int, default=10000,
                        help="img2dataset's --number_sample_per_shard")
    parser.add_argument("--skip-i2d", action="store_true")
    parser.add_argument("--farm", type=int, default=0, metavar="WORKERS",
                        help="also run `pairfarm up --workers WORKERS`, with and without "
                             "lease-ahead, and report the workers' idle fractions")
    parser.add_argument("--farm-batch-size", type=int, default=0,
                        help="--batch-size for `pairfarm up` (0: its default, sized to "
                             "the input)")
    args = parser.parse_args()

    pool = image_pool(args.pool_dir, 48, 0)
    server, port = start_server(args.hosts, args.pool_dir, args.web)
    try:
        with tempfile.TemporaryDirectory(prefix="pairfarm-bench-") as tmp:
            runs, farms, lost = run_tools(Path(tmp), port, args)
    finally:
        server.terminate()
        server.wait(10)
    report(runs, farms, lost, args)
    top = ceiling(pool, ImageSettings(image_size=256, resize_mode="border"), seconds=8)
    print(f"decode+resize ceiling: {top:.1f} img/CPU-s; pairfarm reaches "
          f"{runs[0].per_core / top:.0%} of it")


def run_tools(work: Path, port: int, args: argparse.Namespace) -> tuple[
        list[Run], list[tuple[Run, list[float]]], dict[str, Counter[str]]]:
    """Each tool on the same URL list; the images img2dataset saved that each pairfarm run
    did not, by pairfarm's outcome."""
    listing = work / "urls.parquet"
    url_list(listing, args.urls, args.hosts, port, args.web)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    tools = [("pairfarm", pairfarm_argv)]
    if not args.skip_i2d:
        tools.append(("img2dataset", i2d_argv))
    runs: list[Run] = []
    for name, argv_of in tools:
        out = work / name
        wall, cpu, rss = measure(name, argv_of(listing, out, args), env, work / f"{name}.log")
        ok, count = successes(out)
        runs.append(Run(name, wall, cpu, ok, count, rss))
    farms = farm_runs(listing, work, env, args) if args.farm else []
    lost: dict[str, Counter[str]] = {}
    if not args.skip_i2d:
        for name in ["pairfarm"] + [run.name for run, _ in farms]:
            lost[name] = lost_images(work / "img2dataset", work / name)
    return runs, farms, lost


def report(runs: list[Run], farms: list[tuple[Run, list[float]]],
           lost: dict[str, Counter[str]], args: argparse.Namespace) -> None:
    print(f"{args.urls} URLs over {args.hosts} loopback hosts ({args.web} web), concurrency "
          f"{args.concurrency}, img2dataset processes {args.i2d_processes}, "
          f"{os.cpu_count()} cores")
    print(f"{'tool':12s} {'urls':>6s} {'ok':>6s} {'wall s':>8s} {'CPU s':>8s} {'img/s':>9s} "
          f"{'img/CPU-s':>9s} {'peak RSS':>9s}")
    for run in runs:
        print(run.line())
    for run, idle in farms:
        shares = ", ".join(f"{share:.1%}" for share in idle) or "not reported"
        print(f"{run.line()}  workers idle: {shares}")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if len(runs) == 2:
        i2d = runs[1]
        for run in [runs[0], *(farm for farm, _ in farms)]:
            speed = run.successes / run.wall_s / (i2d.successes / i2d.wall_s)
            print(f"{run.name} / img2dataset: images/s {speed:.2f}x, "
                  f"CPU per image {i2d.per_core / run.per_core:.2f}x")
    for name, counts in lost.items():
        total = sum(counts.values())
        print(f"saved by img2dataset, not by {name}: {total}"
              + (f" ({', '.join(f'{k} {v}' for k, v in counts.most_common())})" if total else ""))

if __name__ == "__main__":
    main()
