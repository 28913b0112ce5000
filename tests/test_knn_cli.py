"""pairfarm index and pairfarm export sisap from the command line, and their README."""

from __future__ import annotations

import json
from pathlib import Path

import click
import h5py
import numpy as np

from knn.command import index_command
from tests.conftest import run_cli
from tests.docs_text import docs_text
from tests.knn_data import clustered, write_embeddings

DOCS = docs_text()  # README.md and docs/*.md: the kNN section may live on either


def test_every_option_and_envvar_is_documented() -> None:
    for param in index_command.params:
        if isinstance(param, click.Option):
            assert param.opts[0] in DOCS, param.opts[0]
            if param.envvar:
                assert f"`{param.envvar}`" in DOCS, param.envvar


def test_index_builds_grows_and_reports_recall(tmp_path: Path) -> None:
    x = clustered(3000, 24, seed=5)
    write_embeddings(tmp_path / "farm", x[:2000], 1000, nsfw_every=10)
    out = run_cli("index", str(tmp_path / "farm"), str(tmp_path / "idx"), "--memory", "64M",
                  "--eval-queries", "100", "--no-progress").stdout
    assert "HNSW32_SQfp16: 1,800 vectors of width 24, 1,800 added (rebuilt: new index)" in out
    assert "efSearch=" in out and "recall@10 " in out
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["recall_at_10"] >= 0.95 and info["ntotal"] == 1800
    write_embeddings(tmp_path / "farm", x[2000:], 1000, nsfw_every=10, first_batch=3)
    out = run_cli("index", str(tmp_path / "farm"), str(tmp_path / "idx"), "--memory", "64M",
                  "--eval-queries", "100", "--no-progress").stdout
    assert "2,700 vectors of width 24, 900 added (grown)" in out


def test_index_errors_are_one_clear_line(tmp_path: Path) -> None:
    proc = run_cli("index", str(tmp_path / "none"), str(tmp_path / "idx"), "--memory", "lots",
                   check=False)
    assert proc.returncode == 1 and "Error: not a memory size: 'lots'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("index", str(tmp_path / "none"), str(tmp_path / "idx"), check=False)
    assert proc.returncode == 1 and "no img_emb/ folder" in proc.stderr


def test_every_sisap_option_is_documented() -> None:
    from knn.sisap_layout import OPTIONS

    for key in OPTIONS:
        assert f"`-O {key}=" in DOCS, key


def test_sisap_export_from_the_command_line(tmp_path: Path) -> None:
    write_embeddings(tmp_path / "farm", clustered(600, 128, seed=2), 200)
    run_cli("export", "sisap", str(tmp_path / "farm"), str(tmp_path / "sisap"),
            "-O", "queries=20", "-O", "neighbours=10", "--no-progress")
    with h5py.File(tmp_path / "sisap" / "laion2B-en-public-gold-standard-v2-400.h5") as f:
        assert f["knns"].shape == (20, 10) and np.array(f["knns"]).min() >= 1
    info = json.loads((tmp_path / "sisap" / "sisap.json").read_text())
    assert (info["n"], info["queries"], info["query_shards"]) == (400, 20, ["00000001"])
    proc = run_cli("export", "sisap", str(tmp_path / "farm"), str(tmp_path / "other"),
                   "-O", "querys=20", check=False)
    assert proc.returncode == 1 and "the sisap layout has no option 'querys'" in proc.stderr
