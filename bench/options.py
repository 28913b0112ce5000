"""Command-line flags the worker benchmarks share (no heavy imports)."""

from __future__ import annotations

import argparse
from pathlib import Path


def server_arguments(parser: argparse.ArgumentParser) -> None:
    """The URL list and server flags the worker benchmarks share."""
    parser.add_argument("--urls", type=int, default=3000)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--pool-dir", type=Path, default=Path("bench/out/pool"))
    parser.add_argument("--web", choices=("uniform", "real"), default="uniform",
                        help="uniform: every answer after 50-300 ms, URLs spread evenly over "
                             "--hosts; real: 3 %% of answers after 2-20 s and hosts drawn "
                             "from a Zipf law (a few hosts with hundreds of URLs, a long tail "
                             "of hosts with one or two)")
