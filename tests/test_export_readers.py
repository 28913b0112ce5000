"""A real farm's export read by the real readers.

The farm: `pairfarm up` against the demo image server, 160 candidates in batches of 40,
post-processed by the demo's tiny CLIP widened to 512 (its projections padded with zero
columns: the same similarities, TFDS's width). Batch 3's tar is damaged after download, so
post-processing fails it for good: the post-processed folder holds batches 1, 2, 4 (a
gap). `pairfarm export` runs, then 80 more candidates arrive (batches 5, 6) and it runs
again: the first files stay as they were.

The readers run in `.venv-tf` in the checkout (`make readers`, which `.ci/run` runs:
tensorflow-cpu, tensorflow-datasets, embedding-reader, webdataset): TFDS's own
`laion400m` builder in both configs, embedding-reader over the clip-retrieval export,
webdataset over the webdataset export. Each image is compared with the picture the server
sent for its own row's URL, and each caption with that URL's caption.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from localfarm.demo import DEMO_MODEL, demo_threshold
from localfarm.demo_server import DemoPlan, DemoServer
from pairfarm.shardformat import embedding_files, key_of, split_key
from tests.conftest import REPO, run_cli

READERS = REPO / ".venv-tf" / "bin" / "python"
BATCH = 40
FIRST, MORE = range(0, 160), range(160, 240)
LAYOUTS = ("webdataset", "tfds-laion400m", "clip-retrieval")
URL = re.compile(r"/img/(\d+)\.jpg$")

needs_readers = pytest.mark.skipif(
    not (REPO / ".venv-tf" / ".installed").exists(),
    reason="no readers' venv .venv-tf (TFDS, embedding-reader, webdataset): `make readers` "
           "builds it, .ci/run does")


def widen_model(folder: Path, width: int = 512) -> Path:
    """The demo's tiny CLIP with ``width``-wide embeddings: its image and text projections
    padded with zero columns, so every embedding is the 32-wide one followed by zeros and
    every cosine similarity is unchanged."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((DEMO_MODEL / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = width
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    tensors = load_file(DEMO_MODEL / "open_clip_model.safetensors")
    for name in ("visual.proj", "text_projection"):
        proj = tensors[name]
        tensors[name] = np.pad(proj, ((0, 0), (0, width - proj.shape[1])))
    save_file(tensors, folder / "open_clip_model.safetensors")
    return folder


def write_candidates(server: DemoServer, numbers: range, path: Path) -> Path:
    items = [server.plan.item(n) for n in numbers]
    pq.write_table(pa.table({"url": [server.url(i.n) for i in items],
                             "caption": [i.caption for i in items],
                             "language": ["en"] * len(items)}), path)
    return path


def up(out: Path, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    t = demo_threshold()
    post = ["--model", f"local-dir:{model}", "--device", "cpu", "--workers", "0",
            "--batch-size", "64", "--threshold", f"en={t}", "--threshold", f"*={t}",
            "--no-nsfw", "--watermark", "off"]
    return run_cli("up", "--out", str(out), "--workers", "1", "--batch-size", str(BATCH),
                   "--port", "0", "--no-progress", "--lease-ttl", "30",
                   "--worker-arg=--allow-cidr=127.0.0.0/8", "--worker-arg=--deadline=10",
                   *(f"--postprocess-arg={a}" for a in post), *args,
                   timeout=600, check=False)


def export_all(out: Path, dest: Path) -> None:
    for layout in LAYOUTS:
        run_cli("export", layout, str(out), str(dest / layout), "--no-progress")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "pairfarm-export.json"}


def done_batches(folder: Path, marker: str) -> list[int]:
    return sorted(int(p.name[:8]) for p in folder.glob(f"*_{marker}.json"))


@dataclass
class Farm:
    server: DemoServer
    out: Path
    dest: Path
    broken: int  # the batch whose tar was damaged before post-processing
    first: dict[str, dict[str, str]]  # layout -> file -> sha256 after the first export
    first_tars: dict[str, list[str]]


@pytest.fixture(scope="module")
def farm() -> Iterator[Farm]:
    root = Path(tempfile.mkdtemp(prefix="pairfarm-export-"))
    server = DemoServer(DemoPlan(seed=3), hosts=4).start()
    try:
        yield _run_farm(server, root)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _run_farm(server: DemoServer, root: Path) -> Farm:
    out, dest = root / "farm", root / "datasets"
    model = widen_model(root / "wide-clip")
    first = write_candidates(server, FIRST, root / "first.parquet")
    downloaded = up(out, model, "--input", str(first), "--no-postprocess")
    assert downloaded.returncode == 0, downloaded.stderr[-3000:]
    batches = done_batches(out / "shards", "stats")
    assert len(batches) == len(FIRST) // BATCH, batches
    tar = out / "shards" / f"{batches[2]:08d}.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # a damaged shard
    up(out, model, "--postprocess")  # that batch fails its post-processing attempts
    done = done_batches(out / "postprocessed", "postprocess")
    assert done == [b for b in batches if b != batches[2]], (batches, done)
    export_all(out, dest)
    first_digests = {layout: digests(dest / layout) for layout in LAYOUTS}
    tars = {layout: sorted(p.name for p in (dest / layout).glob("*.tar")) for layout in LAYOUTS}
    more = write_candidates(server, MORE, root / "more.parquet")
    again = up(out, model, "--input", str(more), "--postprocess")
    assert again.returncode == 0, again.stderr[-3000:]
    export_all(out, dest)
    return Farm(server, out, dest, batches[2], first_digests, tars)


# -- what the farm kept ------------------------------------------------------------------


def kept(farm: Farm) -> list[dict[str, Any]]:
    """The post-processed rows kept, in export order (batch id, then row)."""
    rows = []
    for path in sorted((farm.out / "postprocessed").glob("*_postprocess.json")):
        stem = path.name.split("_")[0]
        table = pq.read_table(farm.out / "postprocessed" / f"{stem}.parquet").to_pylist()
        emb = np.load(farm.out / "postprocessed" / "embeddings" /
                      embedding_files(stem)["img_emb"])
        chosen = [r for r in table if r["keep"]]
        rows += [{**r, "img_emb": e} for r, e in zip(chosen, emb, strict=True)]
    return rows


def number(url: str) -> int:
    m = URL.search(url)
    assert m, url
    return int(m.group(1))


def check_image(server: DemoServer, url: str, pixels: np.ndarray) -> None:
    """The image is the picture the server sent for this URL (resized by the worker)."""
    sent = Image.open(io.BytesIO(server.plan.picture(number(url)))).convert("RGB")
    sent_px = np.asarray(sent.resize((pixels.shape[1], pixels.shape[0]),
                                     Image.Resampling.BICUBIC)).astype(np.float32)
    assert np.abs(pixels[..., :3].astype(np.float32) - sent_px).mean() < 12, url


def check_caption(server: DemoServer, url: str, caption: str) -> None:
    assert caption == server.plan.item(number(url)).caption, url


def read(script: str, *args: str | Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{script}-{len(list(tmp.iterdir()))}.npz"
    proc = subprocess.run([str(READERS), str(REPO / "tests" / "readers" / script),
                           *map(str, args), str(out)], capture_output=True, text=True,
                          timeout=600, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp),
                               "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


# -- the export itself -------------------------------------------------------------------


@pytest.mark.slow
def test_the_export_numbers_from_zero_over_the_gap_and_adds_without_rewriting(
        farm: Farm) -> None:
    rows = kept(farm)
    done = done_batches(farm.out / "postprocessed", "postprocess")
    downloaded = done_batches(farm.out / "shards", "stats")
    assert farm.broken in downloaded and farm.broken not in done and len(done) == 5  # a gap
    assert sorted({split_key(r["key"])[0] for r in rows}) == done
    wds = farm.dest / "webdataset"
    assert farm.first_tars["webdataset"] == [f"{i:08d}.tar" for i in range(3)]
    assert sorted(p.name for p in wds.glob("*.tar")) == [f"{i:08d}.tar" for i in range(5)]
    assert farm.first_tars["tfds-laion400m"] == [f"{i:05d}.tar" for i in range(3)]
    for layout in LAYOUTS:
        now = digests(farm.dest / layout)
        assert {k: now[k] for k in farm.first[layout]} == farm.first[layout], layout
    manifest = json.loads((wds / "pairfarm-export.json").read_text())
    assert manifest["batches"] == done
    assert sum(manifest["counts"]) == len(rows)


# -- the readers -------------------------------------------------------------------------


@pytest.mark.slow
@needs_readers
def test_tfds_laion400m_builder_reads_images_each_with_its_own_row(farm: Farm,
                                                                    tmp_path: Path) -> None:
    rows = kept(farm)
    data = read("read_tfds.py", "images", farm.dest / "tfds-laion400m", tmp=tmp_path)
    examples = json.loads(str(data["rows"]))
    assert int(data["shards"]) == 5 and len(examples) == len(rows)
    assert len({e["key"] for e in examples}) == len(examples)
    by_url = {r["url"]: r for r in rows}
    assert {e["url"] for e in examples} == set(by_url)
    for n, example in enumerate(examples):
        check_caption(farm.server, example["url"], example["caption"])
        check_image(farm.server, example["url"], data[f"image_{n}"])
        assert example["similarity"] == pytest.approx(by_url[example["url"]]["similarity"])


@pytest.mark.slow
@needs_readers
def test_tfds_laion400m_builder_reads_512_wide_embeddings(farm: Farm, tmp_path: Path) -> None:
    rows = {r["url"]: r for r in kept(farm)}
    data = read("read_tfds.py", "embeddings", farm.dest / "tfds-laion400m", tmp=tmp_path)
    examples = json.loads(str(data["rows"]))
    assert len(examples) == len(rows)
    for n, example in enumerate(examples):
        check_caption(farm.server, example["url"], example["caption"])
        emb = data[f"image_embedding_{n}"]
        assert emb.shape == (512,) and emb.dtype == np.float16
        np.testing.assert_array_equal(emb, rows[example["url"]]["img_emb"])


@pytest.mark.slow
@needs_readers
def test_embedding_reader_reads_the_clip_retrieval_export(farm: Farm, tmp_path: Path) -> None:
    rows = kept(farm)
    data = read("read_embeddings.py", farm.dest / "clip-retrieval", tmp=tmp_path)
    meta = json.loads(str(data["rows"]))
    assert int(data["count"]) == len(rows) and int(data["dimension"]) == 512
    assert [m["url"] for m in meta] == [r["url"] for r in rows]  # export order
    counts = json.loads((farm.dest / "clip-retrieval" / "pairfarm-export.json").read_text())
    expected_keys = [key_of(i, row) for i, n in enumerate(counts["counts"]) for row in range(n)]
    assert [m["key"] for m in meta] == expected_keys
    for m, emb, row in zip(meta, data["embeddings"], rows, strict=True):
        check_caption(farm.server, m["url"], m["caption"])
        np.testing.assert_allclose(emb, row["img_emb"].astype(np.float32), atol=1e-3)


@pytest.mark.slow
@needs_readers
def test_webdataset_iterates_shards_with_keys_unique_across_the_dataset(
        farm: Farm, tmp_path: Path) -> None:
    rows = kept(farm)
    data = read("read_webdataset.py", farm.dest / "webdataset", tmp=tmp_path)
    samples = json.loads(str(data["rows"]))
    assert [s["url"] for s in samples] == [r["url"] for r in rows]
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys) == len(rows)
    for n, sample in enumerate(samples):
        shard, _ = split_key(sample["key"])
        assert f"{shard:08d}" == sample["shard"]
        check_caption(farm.server, sample["url"], sample["caption"])
        check_image(farm.server, sample["url"], data[f"image_{n}"])
