"""The dashboard at ``GET /``: its files, and the page rendered by a real headless
Chromium against a real coordinator, compared with ``GET /api/v1/stats``."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from coordinator.dashboard import ASSETS, DIR, INDEX
from pairfarm.client import CoordinatorClient
from pairfarm.protocol import API_PREFIX, FailReport, FarmStats
from tests.conftest import RunningCoordinator, insert_candidates, start_coordinator
from tests.test_status_cli import build_farm

CHROMIUM = Path("/usr/bin/chromium")
FIGURES = {  # element id -> what it shows
    "candidates-total": lambda s: s.candidates_total,
    "candidates-done": lambda s: s.candidates_total - s.candidates_pending,
    "candidates-pending": lambda s: s.candidates_pending,
    "workers-alive": lambda s: s.workers_alive,
    "kept": lambda s: s.kept,
    "dropped": lambda s: s.dropped,
    "postprocess-done": lambda s: s.postprocess_batches_done,
    "postprocess-total": lambda s: s.postprocess_batches_total,
    "bytes-downloaded": lambda s: s.bytes_downloaded,
}
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs /usr/bin/chromium (Debian's chromium)")


class Page(HTMLParser):
    """Attributes of every element with an id, text of the ``dd`` / ``span`` ones, the
    data rows of the tables and the cells of each worker's row (``quarantine:NAME`` for
    its row in the quarantine table)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.text: dict[str, str] = {}
        self.rows: list[dict[str, str | None]] = []
        self.cells: dict[str, list[str]] = {}
        self.body: dict[str, str | None] = {}
        self._open: list[str | None] = []
        self._worker: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        ident = found.get("id")
        if ident:
            self.by_id[ident] = found
        if tag == "body":
            self.body = found
        elif tag in ("dd", "span"):
            self._open.append(ident)
            if ident:
                self.text[ident] = ""
        elif tag == "tr" and any(k.startswith("data-") for k in found):
            self.rows.append(found)
            quarantine = found.get("data-quarantine")
            self._worker = f"quarantine:{quarantine}" if quarantine else found.get(
                "data-worker")
        elif tag == "td" and self._worker:
            self.cells.setdefault(self._worker, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("dd", "span") and self._open:
            self._open.pop()
        elif tag == "tr":
            self._worker = None

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1]:
            self.text[self._open[-1]] += data
        if self._worker and self.cells.get(self._worker):
            self.cells[self._worker][-1] += data


def chromium(url: str, tmp: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium on ``url``; stdout. Its process group is killed by PID when
    it overruns."""
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000",
               *args, url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "HOME": str(tmp)})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return out


def api_stats(coord: RunningCoordinator) -> FarmStats:
    answer = httpx.get(f"{coord.url}{API_PREFIX}/stats", timeout=30)
    return FarmStats.model_validate(answer.json())


def test_dashboard_files_are_served_self_contained(coordinator: RunningCoordinator) -> None:
    index = httpx.get(f"{coordinator.url}/", timeout=30)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in index.headers["content-security-policy"]
    assert 'src="dashboard/dashboard.js"' in index.text
    for name, media_type in ASSETS.items():
        asset = httpx.get(f"{coordinator.url}/dashboard/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"] == media_type
        assert asset.content == (DIR / name).read_bytes()
    assert httpx.get(f"{coordinator.url}/dashboard/../api.py", timeout=30).status_code == 404
    assert httpx.get(f"{coordinator.url}/dashboard/nope.js", timeout=30).status_code == 404
    for name in (INDEX, *ASSETS):  # no CDN, no external font, nothing off the origin
        text = (DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text


@needs_chromium
def test_dashboard_in_headless_chromium_shows_the_api_figures(
        coordinator: RunningCoordinator, tmp_path: Path) -> None:
    ids = build_farm(coordinator)
    dom = chromium(f"{coordinator.url}/", tmp_path, "--dump-dom")
    stats = api_stats(coordinator)
    page = Page()
    page.feed(dom)
    assert page.body.get("data-loaded") == "1", dom[:2000]
    for element, figure in FIGURES.items():
        assert page.by_id[element]["data-value"] == str(figure(stats)), element
    assert float(page.by_id["progress-pct"]["data-value"] or "nan") == pytest.approx(
        stats.progress_pct)
    assert page.text["progress-pct"] == f"{stats.progress_pct:.1f} %" == "75.0 %"
    assert page.text["candidates-total"] == "40" and page.text["kept-ratio"] == "80.0 %"
    outcomes = {r["data-outcome"]: int(r["data-value"] or -1) for r in page.rows
                if "data-outcome" in r}
    assert outcomes == stats.outcomes == {"ok": 25, "timeout": 5}
    workers = [r["data-worker"] for r in page.rows if "data-worker" in r]
    assert workers == [w.name for w in stats.workers] == ["vm-1", "gpu-1"]
    assert page.by_id["throughput-chart"]["data-total"] == str(
        sum(p.candidates for p in stats.throughput)) == "30"
    assert page.by_id["similarity-chart"]["data-total"] == str(sum(stats.similarity.counts))
    name, role, seen, rate, batch, downloaded = page.cells["vm-1"]
    assert (name, role, batch, downloaded) == ("vm-1", "worker", str(ids["held"]), "30")
    assert seen.endswith("s ago") and rate.endswith("/s")
    assert page.cells["gpu-1"][4] == "\u2013", "no batch held"
    assert page.by_id["workers-quarantined"]["data-value"] == "0"
    assert not [r for r in page.rows if "data-quarantine" in r or
                "data-quarantined-until" in r]


@needs_chromium
def test_dashboard_shows_quarantined_workers_who_until_when_and_why(
        db_url: str, tmp_path: Path) -> None:
    """--quarantine-after 1: vm-bad's one failure quarantines it for 900 s; the page lists
    it (name, the API's quarantined_until, time left, reason), vm-good not."""
    insert_candidates(db_url, 30)
    coord = start_coordinator(db_url, tmp_path / "coordinator.log", "--batch-size", "10",
                              "--quarantine-after", "1")
    try:
        with CoordinatorClient(coord.url, coord.token("worker", "vm-bad")) as bad, \
                CoordinatorClient(coord.url, coord.token("worker", "vm-good")) as good:
            bad.register("vm-bad")
            good.register("vm-good")
            lease = bad.lease_download()
            assert lease is not None
            bad.fail("download", lease.batch_id, FailReport(
                lease_token=lease.lease_token, reason="create output directory: File exists"))
            assert good.lease_download() is not None
        dom = chromium(f"{coord.url}/", tmp_path, "--dump-dom")
        stats = api_stats(coord)
    finally:
        coord.stop()
    page = Page()
    page.feed(dom)
    assert page.body.get("data-loaded") == "1", dom[:2000]
    held = {w.name: w for w in stats.workers if w.quarantined_until is not None}
    assert set(held) == {"vm-bad"}
    assert page.by_id["workers-quarantined"]["data-value"] == "1"
    rows = [r for r in page.rows if "data-quarantine" in r]
    assert [r["data-quarantine"] for r in rows] == ["vm-bad"]
    until = held["vm-bad"].quarantined_until
    assert until is not None
    assert datetime.fromisoformat(rows[0]["data-until"] or "") == until
    name, shown_until, left, why = page.cells["quarantine:vm-bad"]
    assert name == "vm-bad" and shown_until
    assert re.fullmatch(r"1[45]m \d\ds", left), left  # 900 s, less the render's time
    assert why == held["vm-bad"].quarantine_reason
    assert "File exists" in why
    marked = {r["data-worker"]: r.get("data-quarantined-until") for r in page.rows
              if "data-worker" in r}
    assert marked["vm-good"] is None and marked["vm-bad"]


@needs_chromium
def test_dashboard_screenshot(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    build_farm(coordinator)
    shot = tmp_path / "dashboard.png"
    chromium(f"{coordinator.url}/", tmp_path, f"--screenshot={shot}",
             "--window-size=1280,1400", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1400)
    assert len(data) > 20_000, "a blank page compresses to a few KB"
