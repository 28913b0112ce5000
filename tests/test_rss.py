"""Peak RSS is the process's own, not the parent's high-water mark inherited at exec."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pairfarm.rss import _vm_hwm, peak_rss_bytes

CHILD = "from pairfarm.rss import peak_rss_bytes; print(peak_rss_bytes())"


def test_vm_hwm_is_read_in_bytes() -> None:
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   13624 kB\nVmRSS:\t 12000 kB\n"
    assert _vm_hwm(status) == 13624 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux")
def test_a_child_of_a_large_parent_reports_its_own_peak() -> None:
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page
    assert peak_rss_bytes() > 400 * 2**20
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True).stdout
    del ballast
    assert int(out) < 200 * 2**20
