"""The node's lease loop, with the coordinator's answers scripted at the transport
(``httpx.MockTransport``): completion report, fencing on 409, failure reports.
The loop against the real coordinator is in ``test_gpu_node_coordinator.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import torch

from gpu_postprocess.models import ModelSpec
from gpu_postprocess.node import Node, NodeStopped
from gpu_postprocess.pipeline import Scorer, build_scorer
from gpu_postprocess.settings import (
    NodeSettings,
    OutputSettings,
    ScoringSettings,
    parse_thresholds,
)
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings
from pairfarm.client import CoordinatorClient, Unauthorized
from pairfarm.protocol import API_PREFIX, ShardFiles
from tests.gpu_shards import write_shard
from tests.gpu_tiny import TINY_MODEL, evaluation_rows, gap

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    t = gap()["threshold"]
    return build_scorer(ScoringSettings(
        model=ModelSpec(TINY_MODEL), device="cpu", workers=0, batch_size=8,
        thresholds=parse_thresholds([f"en={t}", f"*={t}"]),
        watermark=WatermarkSettings(kind=WatermarkKind.OFF)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ShardFiles:
    rows, _ = evaluation_rows()
    return write_shard(tmp_path_factory.mktemp("dl"), 11, rows[:24])


def lease_body(files: ShardFiles, batch_id: int = 11) -> dict[str, object]:
    expires = datetime.now(UTC) + timedelta(minutes=5)
    return {"batch_id": batch_id, "lease_token": "tok-11", "lease_expires_at":
            expires.isoformat(), "attempt": 1, "shard": files.model_dump(), "count": 24}


class Script:
    """The coordinator's answers, and every request the node made."""

    def __init__(self, files: ShardFiles, *, heartbeat_status: int = 200,
                 lease_status: int = 200) -> None:
        self.files, self.heartbeat_status, self.lease_status = files, heartbeat_status, \
            lease_status
        self.leases_left = 1
        self.requests: list[tuple[str, dict[str, object]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(API_PREFIX)
        body = json.loads(request.content or b"{}")
        self.requests.append((path, body))
        if path == "/postprocess/lease":
            return self._lease()
        if path.endswith("/heartbeat"):
            return self._heartbeat()
        if path.endswith(("/complete", "/fail")):
            return httpx.Response(200, json={"batch_id": 11, "status": "done", "attempts": 1})
        return httpx.Response(404, json={"error": "not_found", "detail": path})

    def _lease(self) -> httpx.Response:
        if self.lease_status != 200:
            return httpx.Response(self.lease_status, json={"error": "x", "detail": "no"})
        if self.leases_left == 0:
            return httpx.Response(204)
        self.leases_left -= 1
        return httpx.Response(200, json=lease_body(self.files))

    def _heartbeat(self) -> httpx.Response:
        if self.heartbeat_status == 409:
            return httpx.Response(409, json={"error": "lease_lost", "detail": "gone"})
        later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        return httpx.Response(200, json={"lease_expires_at": later})

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


def node(script: Script, scorer: Scorer, tmp_path: Path, heartbeat_s: float = 30.0,
         stop_after_failures: int = 3) -> Node:
    client = CoordinatorClient("http://coordinator.test", "gpu-token",
                               transport=httpx.MockTransport(script))
    settings = NodeSettings(coordinator="http://coordinator.test", token="gpu-token",
                            workdir=tmp_path / "work", exit_when_idle=True,
                            stop_after_failures=stop_after_failures)
    return Node(client, scorer, settings, out=OutputSettings(out_dir=tmp_path / "out"),
                heartbeat_s=heartbeat_s, progress=lambda batch, total: lambda n: None)


def test_leases_processes_and_completes_with_counts(scorer: Scorer, files: ShardFiles,
                                                    tmp_path: Path) -> None:
    script = Script(files)
    results = node(script, scorer, tmp_path).run()
    assert [r.batch_id for r in results] == [11]
    assert script.paths() == ["/postprocess/lease", "/postprocess/11/complete",
                              "/postprocess/lease"]
    report = script.requests[1][1]
    _, match = evaluation_rows()
    assert report["lease_token"] == "tok-11"
    assert report["kept"] == sum(match[:24])
    assert report["dropped"] == 24 - sum(match[:24])
    assert report["drop_reasons"] == {"low_similarity": 24 - sum(match[:24])}
    assert sum(report["similarity_counts"]) == 24  # type: ignore[arg-type]
    assert Path(str(report["outputs"]["tar"])).is_file()  # type: ignore[index]
    assert not list((tmp_path / "work").iterdir())  # scratch folder removed


def test_lost_lease_discards_the_work(scorer: Scorer, files: ShardFiles,
                                      tmp_path: Path) -> None:
    script = Script(files, heartbeat_status=409)
    results = node(script, scorer, tmp_path, heartbeat_s=0.001).run()
    assert results == []
    assert "/postprocess/11/complete" not in script.paths()
    assert "/postprocess/11/fail" not in script.paths()


def test_corrupt_shard_is_reported_failed(scorer: Scorer, files: ShardFiles,
                                          tmp_path: Path) -> None:
    bad = files.model_copy(update={"tar_sha256": "f" * 64})
    script = Script(bad)
    assert node(script, scorer, tmp_path).run() == []
    fail = [b for p, b in script.requests if p == "/postprocess/11/fail"]
    assert len(fail) == 1
    assert fail[0]["release"] is False and "sha256" in str(fail[0]["reason"])
    assert fail[0]["cause"] == "batch", "a corrupt shard is the batch's failure"


def fails(script: Script) -> list[dict[str, object]]:
    return [b for p, b in script.requests if p == "/postprocess/11/fail"]


@pytest.mark.parametrize("broken", ["out", "work"])
def test_own_failures_spend_no_attempt_and_stop_the_node(
        scorer: Scorer, files: ShardFiles, tmp_path: Path, broken: str) -> None:
    """--out (or --workdir) names a file: every batch fails on this machine. Each is given
    back with cause "worker"; after 3 in a row the node stops, 2 leases left untaken."""
    (tmp_path / broken).write_text("a file, not a folder")
    script = Script(files)
    script.leases_left = 5
    with pytest.raises(NodeStopped, match="3 batches in a row failed on this machine"):
        node(script, scorer, tmp_path).run()
    assert script.paths() == ["/postprocess/lease", "/postprocess/11/fail"] * 3
    assert [(f["cause"], f["release"]) for f in fails(script)] == [("worker", False)] * 3
    assert all(str(tmp_path / broken) in str(f["reason"]) for f in fails(script))
    assert script.leases_left == 2


def test_out_of_memory_is_the_machines_and_a_completion_resets_the_count(
        scorer: Scorer, files: ShardFiles, tmp_path: Path) -> None:
    """Batches 1, 2, 4, 5 run out of memory (a real allocation PyTorch's CPU allocator
    refuses, made while scoring), batch 3 completes: never 3 own failures in a row, so
    the node works all 5 leases; the 4 failures are the machine's (no attempt spent)."""
    calls = iter(range(1, 6))

    def progress(batch: int, total: int) -> Callable[[int], None]:
        n = next(calls)

        def tick(done: int) -> None:
            if n != 3:
                torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: refused

        return tick

    script = Script(files)
    script.leases_left = 5
    worker = node(script, scorer, tmp_path)
    worker.progress = progress
    assert [r.batch_id for r in worker.run()] == [11]
    assert [(f["cause"], f["release"]) for f in fails(script)] == [("worker", False)] * 4
    assert all("allocate memory" in str(f["reason"]) for f in fails(script))
    assert script.paths().count("/postprocess/11/complete") == 1
    assert script.leases_left == 0


def test_refused_token_stops_the_node(scorer: Scorer, files: ShardFiles,
                                      tmp_path: Path) -> None:
    with pytest.raises(Unauthorized):
        node(Script(files, lease_status=401), scorer, tmp_path).run()


def test_cli_needs_a_token_and_an_http_coordinator() -> None:
    from tests.conftest import run_cli

    proc = run_cli("postprocess", "--coordinator", "http://127.0.0.1:9", check=False,
                   env=_env_without_token())
    assert proc.returncode == 2 and "--token" in proc.stderr
    proc = run_cli("postprocess", "--coordinator", "ftp://x", "--token", "t", check=False)
    assert proc.returncode == 1 and "http(s) URL" in proc.stderr


def _env_without_token() -> dict[str, str]:
    from tests.conftest import cli_env

    env = cli_env()
    env.pop("PAIRFARM_TOKEN", None)
    return env


def test_postprocess_help_imports_no_torch() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env

    code = ("import sys; from click.testing import CliRunner; from pairfarm.cli import cli;"
            "r = CliRunner().invoke(cli, ['postprocess', '--help']);"
            "heavy = {'torch', 'open_clip', 'timm', 'numpy'};"
            "print(r.exit_code, sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, check=True).stdout
    assert out.strip() == "0 []"


def test_interrupt_releases_the_batch_unworked(scorer: Scorer, files: ShardFiles,
                                              tmp_path: Path) -> None:
    def interrupted(batch: int, total: int) -> Callable[[int], None]:
        def tick(n: int) -> None:
            raise KeyboardInterrupt

        return tick

    script = Script(files)
    n = node(script, scorer, tmp_path)
    n.progress = interrupted
    with pytest.raises(KeyboardInterrupt):
        n.run()
    fail = [b for p, b in script.requests if p == "/postprocess/11/fail"]
    assert len(fail) == 1 and fail[0]["release"] is True
    assert "/postprocess/11/complete" not in script.paths()
