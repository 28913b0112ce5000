"""The CPU ceiling: decode + resize + encode alone, images per CPU-second.

``python -m bench.bench_decode`` runs ``worker.imaging.process_image`` over the
benchmark server's JPEG pool (the same images the worker benchmark downloads) in one
thread, with the same settings as the worker benchmark, and prints images/s per core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.image_server import image_pool
from worker.imaging import process_image
from worker.settings import ImageSettings


def ceiling(pool: list[bytes], settings: ImageSettings, seconds: float = 10.0) -> float:
    """Images per CPU-second of ``process_image`` over ``pool``, single thread."""
    done = 0
    cpu_start = time.process_time()
    while time.process_time() - cpu_start < seconds:
        for body in pool:
            process_image(body, settings)
            done += 1
    return done / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool-dir", type=Path, default=Path("bench/out/pool"))
    parser.add_argument("--pool-size", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="border")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    pool = image_pool(args.pool_dir, args.pool_size, 0)
    settings = ImageSettings(image_size=args.image_size, resize_mode=args.resize_mode)
    rate = ceiling(pool, settings, args.seconds)
    mean_kb = sum(map(len, pool)) / len(pool) / 1024
    print(f"decode+resize+encode ceiling: {rate:.1f} images per CPU-second "
          f"({len(pool)} JPEGs, {mean_kb:.0f} KB mean, {args.resize_mode} {args.image_size})")


if __name__ == "__main__":
    main()
