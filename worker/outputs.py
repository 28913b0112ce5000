"""The worker's output location, checked before it takes any batch.

A worker whose output cannot be written (a file where the directory should be, a
read-only mount, a bucket without write access) would fail every batch it leases; the
check makes it stop before it registers, with the storage's own message.

Error handling: every storage error becomes ``ShardWriteError`` naming the location.
"""

from __future__ import annotations

import uuid

import fsspec

from worker.errors import ShardWriteError

PROBE_PREFIX = ".pairfarm-probe-"


def check_output(fs: fsspec.AbstractFileSystem, directory: str) -> None:
    """Create ``directory`` and write, then delete, a small hidden file in it. Blocking."""
    probe = f"{directory.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        fs.makedirs(directory, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise ShardWriteError(f"create output directory {directory}: {exc}") from exc
    try:
        with fs.open(probe, "wb") as out:
            out.write(b"pairfarm")
        fs.rm(probe)
    except (OSError, ValueError) as exc:
        raise ShardWriteError(f"write a file in {directory}: {exc}") from exc
