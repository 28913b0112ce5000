"""moto's S3 server on loopback, for the tests that archive or hand shards over to S3."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import free_port


@contextmanager
def moto_server(log_dir: Path, bucket: str, timeout: float = 60) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with ``bucket`` made; its endpoint URL.
    The server is stopped on exit; its output goes to ``log_dir/moto.log``."""
    port = free_port()
    with (log_dir / "moto.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not put_ok(f"{endpoint}/{bucket}"):
            assert time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def put_ok(url: str, content: bytes = b"") -> bool:
    """A PUT to ``url`` answered 200 (False when nothing answers)."""
    try:
        return httpx.put(url, content=content, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
