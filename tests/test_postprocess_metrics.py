"""The post-processing node's Prometheus metrics: a tiny shard through the node (tiny
committed model, coordinator scripted at the transport), scraped over HTTP."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gpu_postprocess.errors import SettingsError
from gpu_postprocess.metrics import NodeMetrics, build_metrics, metric_names, serve_metrics
from gpu_postprocess.models import ModelSpec
from gpu_postprocess.node import Node
from gpu_postprocess.pipeline import Scorer, build_scorer
from gpu_postprocess.settings import (
    NodeSettings,
    OutputSettings,
    ScoringSettings,
    parse_thresholds,
)
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings
from pairfarm.client import CoordinatorClient
from pairfarm.protocol import ShardFiles
from tests.gpu_shards import write_shard
from tests.gpu_tiny import TINY_MODEL, evaluation_rows, gap
from tests.test_gpu_node import Script

ROWS = 24


def tiny_scorer(device: str) -> Scorer:
    t = gap()["threshold"]
    return build_scorer(ScoringSettings(
        model=ModelSpec(TINY_MODEL), device=device, workers=0, batch_size=8,
        thresholds=parse_thresholds([f"en={t}", f"*={t}"]),
        watermark=WatermarkSettings(kind=WatermarkKind.OFF)))


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return tiny_scorer("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ShardFiles:
    rows, _ = evaluation_rows()
    return write_shard(tmp_path_factory.mktemp("dl"), 11, rows[:ROWS])


def make_node(script: Script, scorer: Scorer, tmp_path: Path, metrics: NodeMetrics,
              heartbeat_s: float = 30.0) -> Node:
    client = CoordinatorClient("http://coordinator.test", "gpu-token",
                               transport=httpx.MockTransport(script))
    settings = NodeSettings(coordinator="http://coordinator.test", token="gpu-token",
                            workdir=tmp_path / "work", exit_when_idle=True)
    return Node(client, scorer, settings, out=OutputSettings(out_dir=tmp_path / "out"),
                heartbeat_s=heartbeat_s, progress=lambda batch, total: lambda n: None,
                metrics=metrics)


def sample_of(metrics: NodeMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


def test_a_completed_shard_is_counted_and_served(scorer: Scorer, files: ShardFiles,
                                                 tmp_path: Path) -> None:
    metrics = build_metrics()
    with serve_metrics(metrics, 0, "127.0.0.1") as port:
        [result] = make_node(Script(files), scorer, tmp_path, metrics).run()
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    _, match = evaluation_rows()
    assert result.report.kept == sum(match[:ROWS])  # the tiny model separates the rows
    kept = samples[("pairfarm_postprocess_node_samples_total", (("decision", "kept"),))]
    dropped = samples[("pairfarm_postprocess_node_samples_total", (("decision", "dropped"),))]
    assert (kept, dropped) == (result.report.kept, result.report.dropped)
    assert samples[("pairfarm_postprocess_shard_duration_seconds_count", ())] == 1
    assert samples[("pairfarm_postprocess_shard_duration_seconds_sum", ())] == pytest.approx(
        result.report.duration_s)
    assert samples[("pairfarm_postprocess_samples_per_second", ())] == pytest.approx(
        ROWS / result.report.duration_s)
    assert samples[("pairfarm_postprocess_shards_total", (("result", "completed"),))] == 1
    assert samples[("pairfarm_postprocess_shards_total", (("result", "failed"),))] == 0
    assert samples[("pairfarm_postprocess_device_memory_bytes", (("device", "cpu"),))] > 0
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_a_corrupt_shard_is_counted_failed(scorer: Scorer, files: ShardFiles,
                                           tmp_path: Path) -> None:
    metrics = build_metrics()
    bad = files.model_copy(update={"tar_sha256": "f" * 64})
    assert make_node(Script(bad), scorer, tmp_path, metrics).run() == []
    assert sample_of(metrics, "pairfarm_postprocess_shards_total", result="failed") == 1
    assert sample_of(metrics, "pairfarm_postprocess_shards_total", result="completed") == 0
    assert sample_of(metrics, "pairfarm_postprocess_shard_duration_seconds_count") == 0
    assert sample_of(metrics, "pairfarm_postprocess_node_samples_total", decision="kept") == 0
    assert sample_of(metrics, "pairfarm_postprocess_device_memory_bytes", device="cpu") > 0


def test_a_lost_lease_is_counted_lost(scorer: Scorer, files: ShardFiles,
                                      tmp_path: Path) -> None:
    metrics = build_metrics()
    script = Script(files, heartbeat_status=409)
    assert make_node(script, scorer, tmp_path, metrics, heartbeat_s=0.001).run() == []
    assert sample_of(metrics, "pairfarm_postprocess_shards_total", result="lost") == 1
    assert sample_of(metrics, "pairfarm_postprocess_node_samples_total", decision="dropped") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_is_the_allocators_peak(files: ShardFiles, tmp_path: Path) -> None:
    metrics = build_metrics()
    make_node(Script(files), tiny_scorer("cuda"), tmp_path, metrics).run()
    device = f"cuda:{torch.cuda.current_device()}"
    peak = sample_of(metrics, "pairfarm_postprocess_device_memory_bytes", device=device)
    assert peak == torch.cuda.max_memory_allocated() > 0
    assert sample_of(metrics, "pairfarm_postprocess_shards_total", result="completed") == 1


def test_metric_names_are_the_spec_names() -> None:
    assert {"pairfarm_postprocess_node_samples_total",
            "pairfarm_postprocess_samples_per_second",
            "pairfarm_postprocess_shard_duration_seconds_bucket",
            "pairfarm_postprocess_shard_duration_seconds_sum",
            "pairfarm_postprocess_shard_duration_seconds_count",
            "pairfarm_postprocess_shards_total", "pairfarm_postprocess_device_memory_bytes",
            "process_resident_memory_bytes"} <= metric_names()


def test_off_busy_port_and_bad_port() -> None:
    with serve_metrics(build_metrics(), None, "127.0.0.1") as port:
        assert port is None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SettingsError, match="cannot serve metrics"), \
                serve_metrics(build_metrics(), busy.getsockname()[1], "127.0.0.1"):
            pass
    with pytest.raises(SettingsError, match="--metrics-port"):
        NodeSettings(coordinator="http://c", token="t", workdir=Path("w"), metrics_port=-1)


def test_metrics_module_imports_no_torch() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env

    code = ("import sys, gpu_postprocess.metrics as m; m.metric_names();"
            "print(sorted({'torch', 'numpy', 'open_clip'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
