"""Peak resident memory of this process.

``getrusage(RUSAGE_SELF).ru_maxrss`` is wrong for a process started by another: Linux
carries the high-water mark of the pre-exec address space (the parent's, copied by fork)
into the child, so a worker spawned by a 1.7 GB parent reports 1.7 GB. ``VmHWM`` in
``/proc/self/status`` belongs to the address space created by exec, so it is this
program's own peak.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak RSS in bytes (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _vm_hwm(text)


def _vm_hwm(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
