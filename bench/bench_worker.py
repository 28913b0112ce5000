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
``wait4``), wall seconds, successes (from the stats json files), and peak RSS (the sum
over the process tree, sampled every 50 ms). Images/s per core = successes / CPU
seconds. It also prints the decode+resize ceiling (``bench.bench_decode``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.bench_decode import ceiling
from bench.image_server import image_pool
from bench.options import server_arguments
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
            log: Path) -> tuple[float, float, float]:
    """(wall s, CPU s of the tree, peak summed RSS MB) of ``argv``."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = RssSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, sampler.peak / 1024 / 1024


def successes(directory: Path) -> tuple[int, int]:
    ok = count = 0
    for stats in directory.glob("*_stats.json"):
        data = json.loads(stats.read_text())
        ok += data["successes"]
        count += data["count"]
    return ok, count


def start_server(hosts: int, pool_dir: Path) -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen([sys.executable, "-m", "bench.image_server", "--hosts", str(hosts),
                               "--pool-dir", str(pool_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("READY"):
        server.kill()
        sys.exit(f"image server did not start: {line!r}")
    return server, int(line.split()[1])


def url_list(path: Path, count: int, hosts: int, port: int) -> None:
    urls = [f"http://127.0.0.{n % hosts + 1}:{port}/img/{n}.jpg" for n in range(count)]
    pq.write_table(pa.table({"url": urls, "caption": [f"image {n}" for n in range(count)]}),
                   path)


def pairfarm_argv(listing: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "pairfarm", "download", str(listing), "-o", str(out),
            "--allow-cidr", "127.0.0.0/8", "--image-size", "256", "--resize-mode", "border",
            "--quality", "95", "--read-timeout", "10", "--concurrency", str(args.concurrency),
            "--per-host", "16", "--shard-size", "10000", "--no-progress"]


def up_argv(listing: Path, out: Path, args: argparse.Namespace,
            lease_ahead_at: int | None) -> list[str]:
    worker = ["--allow-cidr=127.0.0.0/8", "--image-size=256", "--resize-mode=border",
              "--quality=95", "--read-timeout=10", f"--concurrency={args.concurrency}",
              "--per-host=16"]
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
                                 work / f"{name}.log")
        ok, count = successes(out / "shards")
        runs.append((Run(name, wall, cpu, ok, count, rss), idle_fractions(out / "logs")))
    return runs


def i2d_argv(listing: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [str(args.i2d), "--url_list", str(listing), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
            "--output_folder", str(out), "--image_size", "256", "--resize_mode", "border",
            "--encode_quality", "95", "--timeout", "10", "--retries", "0",
            "--processes_count", str(args.i2d_processes), "--thread_count",
            str(args.concurrency), "--number_sample_per_shard", "10000",
            "--enable_wandb", "False", "--distributor", "multiprocessing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(parser)
    parser.add_argument("--i2d", type=Path, default=Path(".venv-i2d/bin/img2dataset"))
    parser.add_argument("--i2d-processes", type=int, default=1)
    parser.add_argument("--skip-i2d", action="store_true")
    parser.add_argument("--farm", type=int, default=0, metavar="WORKERS",
                        help="also run `pairfarm up --workers WORKERS`, with and without "
                             "lease-ahead, and report the workers' idle fractions")
    parser.add_argument("--farm-batch-size", type=int, default=0,
                        help="--batch-size for `pairfarm up` (0: its default, sized to "
                             "the input)")
    args = parser.parse_args()

    pool = image_pool(args.pool_dir, 48, 0)
    server, port = start_server(args.hosts, args.pool_dir)
    runs: list[Run] = []
    farms: list[tuple[Run, list[float]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pairfarm-bench-") as tmp:
            work = Path(tmp)
            listing = work / "urls.parquet"
            url_list(listing, args.urls, args.hosts, port)
            env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
            tools = [("pairfarm", pairfarm_argv)]
            if not args.skip_i2d:
                tools.append(("img2dataset", i2d_argv))
            for name, argv_of in tools:
                out = work / name
                wall, cpu, rss = measure(name, argv_of(listing, out, args), env,
                                         work / f"{name}.log")
                ok, count = successes(out)
                runs.append(Run(name, wall, cpu, ok, count, rss))
            if args.farm:
                farms = farm_runs(listing, work, env, args)
    finally:
        server.terminate()
        server.wait(10)

    print(f"{args.urls} URLs over {args.hosts} loopback hosts, concurrency {args.concurrency}, "
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
        print(f"pairfarm / img2dataset, images per CPU-second: "
              f"{runs[0].per_core / runs[1].per_core:.2f}x")
    top = ceiling(pool, ImageSettings(image_size=256, resize_mode="border"), seconds=8)
    print(f"decode+resize ceiling: {top:.1f} img/CPU-s; pairfarm reaches "
          f"{runs[0].per_core / top:.0%} of it")


if __name__ == "__main__":
    main()
