"""`pairfarm export` killed with SIGKILL mid-export, as a command, then run again.

The kill lands at a known point without sleeping on speed: the tar of the source's second
batch is a FIFO, so the export blocks opening it after it has committed shard 0 and
staged part of shard 1 (``--samples-per-shard``, the first batch has more samples than a
shard). The test sees the export waiting on the FIFO (a non-blocking open for writing
succeeds only when a reader has it open), kills it, puts the real tar in place and runs
the export again: every sample exactly once, shards consecutive, the killed run's
temporary files removed, and the files equal to those of an export never interrupted.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from export.run import ExportSettings, export
from tests.conftest import REPO, cli_env, run_cli
from tests.test_export import _check_webdataset, _farm, _wds_samples
from tests.test_export_s3 import _files


def _reader_waiting(fifo: Path) -> bool:
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return False
        raise
    os.close(fd)
    return True


def test_a_kill_9_mid_export_then_a_rerun_loses_and_repeats_nothing(tmp_path: Path) -> None:
    farm = tmp_path / "shards"
    captions = _farm(farm, {1: 8, 2: 6, 4: 5})  # 6, 4 and 4 ok rows
    per_shard = "4"
    whole = tmp_path / "whole"
    export(ExportSettings(layout="webdataset", source_url=farm, dest=whole,
                          samples_per_shard=int(per_shard)))

    tar = farm / "00000002.tar"
    real = tar.read_bytes()
    tar.unlink()
    os.mkfifo(tar)
    dest = tmp_path / "wds"
    args = ["export", "webdataset", str(farm), str(dest), "--samples-per-shard", per_shard,
            "--no-progress"]
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pairfarm", *args], cwd=REPO,
                                env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _reader_waiting(tar):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "the export never reached batch 2"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    # killed with shard 0 complete and shard 1 half staged: only temporary names
    assert (dest / "00000000_stats.json").exists()
    staged = sorted(p.name for p in dest.iterdir() if p.name.startswith("."))
    assert ".00000001.tar.tmp" in staged
    assert not (dest / "00000001.tar").exists()
    assert len(_wds_samples(dest)) == 4

    tar.unlink()
    tar.write_bytes(real)
    out = run_cli(*args)
    assert f"{len(captions)} samples in all" in out.stdout
    _check_webdataset(dest, captions)  # each sample once, in order, shards from 0
    assert not [p for p in dest.rglob(".*") if p.is_file()]
    assert _files(dest) == _files(whole)
